"""What a finished ReconstructionWorkChain's called processes say: time per stage and why candidates failed.

Shared by the command line (``result.json``, error lines) and the benchmark's daemon runner, which must
report a workflow exactly as a user sees it.
"""

from __future__ import annotations

__all__ = ["failure_reasons", "stage_timings"]


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
