"""What a finished ReconstructionWorkChain's graph says: time per stage, why candidates failed, alternatives.

Shared by the command line (``result.json``, error lines) and the benchmark's daemon runner, which must
report a workflow exactly as a user sees it.
"""

from __future__ import annotations

__all__ = ["alternatives", "failure_reasons", "stage_timings", "template_id"]


def stage_timings(node) -> dict:
    """Wall time of each called process, summed per stage name."""
    out: dict[str, float] = {}
    for child in node.called_descendants:
        label = child.process_label or "?"
        if label in ("decide", "collect_trace"):
            label = "agent"
        seconds = (child.mtime - child.ctime).total_seconds()
        out[label] = out.get(label, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(out.items())}


def failure_reasons(node, limit: int = 300) -> str:
    """Why the candidates failed, from the steps that raised: the exit message alone ("no candidate above
    threshold") hides the actionable part ("… 2.00× the template's … check the pixel size")."""
    reasons = []
    for child in node.called_descendants:
        if child.is_excepted and child.exception:
            lines = [line for line in child.exception.strip().splitlines() if line.strip()]
            reason = lines[-1].split(": ", 1)[-1] if lines else ""
            if reason and reason not in reasons:
                reasons.append(reason)
    text = " | ".join(reasons)
    return f" ({text[:limit]}{'…' if len(text) > limit else ''})" if text else ""


def template_id(template) -> str:
    """The id a template node is reported by: its library id, else its label, else its uuid."""
    return template.base.extras.get("template_id", template.label or template.uuid)


def alternatives(outputs: dict) -> list[dict]:
    """The ``alternatives`` outputs (link label → node) as {formula, template_id, verification_score}, best
    first: read back from the provenance graph (template: the reconstruction's input; score: the
    verification that used the structure), so nothing is stored twice."""
    from aiida import orm

    from ..data.structures import structure_to_atoms
    from ..imaging.structures import reduced_formula

    out = []
    for label, structure in outputs.items():
        if not label.startswith("alternatives__"):
            continue
        creator = structure.creator
        template = creator.inputs.template if creator is not None and "template" in creator.inputs else None
        score = None
        for link in structure.base.links.get_outgoing(node_class=orm.CalcFunctionNode).all():
            if link.node.process_label == "verify_candidate" and "result" in link.node.outputs:
                score = float(link.node.outputs.result.get("score"))
        out.append({
            "formula": reduced_formula(structure_to_atoms(structure)),
            "template_id": None if template is None else template_id(template),
            "verification_score": score,
            "uuid": structure.uuid,
        })
    return sorted(out, key=lambda a: -(a["verification_score"] or 0.0))
