"""``bench run --daemon``: the benchmark's product pipeline as ``ReconstructionWorkChain``s on the AiiDA daemon.

The in-process ``pipeline`` rows measure the core loop; these rows (pipeline name ``workchain``) measure the
product as users run it — every image a ``StemImageData``, every decision and step a node — and let the
daemon's workers reconstruct many images at once. Each image gets one WorkChain from the ``moderate``
protocol with the run's ``k``, policy and relaxation, retrieving from a ``TemplateLibraryData`` holding the
very library the in-process rows use (with ``--exclude-from-library`` that filtered library is stored as
its own node, under its own build key). Finished WorkChains become ``PipelineResult``s, which ``bench.run``
scores exactly like the in-process results (``metrics.compare``, failure types, energies).

Resume: ``daemon_pks.json`` in the set folder records image → WorkChain (pk, uuid) with the options it
was submitted with, written after every submission. A rerun with the same options reuses those WorkChains
(finished or still running) and submits only the missing ones, so an interrupted run, a stopped daemon
or a rescoring never repeats work; a killed WorkChain is submitted again, any other one is kept (an
excepted one is a failure row, not a retry loop).

Failure stage by exit status: 320 (unusable image) and 400 (no lattice) → lattice; 401/402 before any
candidate was retrieved → retrieval; otherwise the candidates decide, as for the in-process rows.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Callable

from ..errors import AutomatError
from .pipeline import PipelineResult

__all__ = ["PROTOCOL", "RECORD", "check_daemon", "daemon_span", "library_node", "preflight", "result_of_workchain",
           "run_workchains"]

RECORD = "daemon_pks.json"
PROTOCOL = "moderate"
#: called-process label (``workflows.process_summary.stage_timings``) → the in-process timing key
STAGES = {"measure_lattice": "lattice_s", "retrieve": "retrieval_s", "reconstruct_candidate": "reconstruction_s",
          "verify_candidate": "verification_s", "RelaxCalculation": "relax_s", "denoise_image": "denoise_s",
          "agent": "agent_s"}
_TERMINAL = ("finished", "excepted", "killed")


def check_daemon() -> None:
    """Refuse, in one line, when no daemon runs: nothing submitted would ever finish."""
    from aiida.manage import get_manager

    manager = get_manager()
    if not manager.get_daemon_client().is_daemon_running:
        raise AutomatError(f"no daemon is running for profile {manager.get_profile().name}; start one with "
                           "`aiida-automat daemon start 2` and run again (finished WorkChains are reused)")


def preflight(bench_dir) -> None:
    """Before any library is built: the profile, and a daemon unless an earlier run left WorkChains to reuse."""
    from ..profile import ensure_setup

    ensure_setup()
    if not (pathlib.Path(bench_dir) / RECORD).is_file():
        check_daemon()


def library_node(lib):
    """The stored ``TemplateLibraryData`` with ``lib``'s build key, stored from ``lib`` when there is none."""
    from ..data.library import TemplateLibraryData

    node = TemplateLibraryData.find(lib.build_key)
    return node if node is not None else TemplateLibraryData.from_library(lib).store()


def _options(lib, k, policy, llm, relax, potential) -> dict:
    """What decides a WorkChain's result besides its image: a recorded one is reused only if these match."""
    return {"protocol": PROTOCOL, "library_build_key": lib.build_key, "k": int(k), "policy": policy,
            "llm_model": llm["model"] if llm else None, "relax": bool(relax), "potential": potential if relax else None}


def _read_record(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("images", {}))
    except (ValueError, AttributeError):
        raise AutomatError(f"{path} is not a record of submitted WorkChains; move it away to submit afresh") from None


def _write_record(path: pathlib.Path, images: dict) -> None:
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps({"version": 1, "images": images}, indent=1))
    os.replace(tmp, path)


def _reusable(entry: dict | None, options: dict):
    """The recorded WorkChain node, if it was submitted with ``options`` and was not killed."""
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    if not entry or entry.get("options") != options:
        return None
    try:
        node = orm.load_node(uuid=entry["uuid"])
    except (NotExistent, MultipleObjectsError, KeyError):
        return None  # another profile, or the database was reset
    return None if node.is_killed else node


def _states(pks) -> dict:
    """pk → process state, read fresh (a column projection, not a cached node) and with ``all()``: an
    unfinished cursor would hold a read transaction and make the next write fail once a worker commits."""
    from aiida import orm

    qb = orm.QueryBuilder().append(orm.ProcessNode, filters={"id": {"in": list(pks)}},
                                   project=["id", "attributes.process_state"])
    return {pk: state for pk, state in qb.all()}


def _wait(pks: list, progress, poll_s: float) -> None:
    """Until every WorkChain has terminated; a daemon that stops meanwhile is an error, not a hang."""
    from aiida.manage import get_manager

    total, last = len(pks), -1
    while True:
        done = sum(1 for s in _states(pks).values() if s in _TERMINAL)
        if progress and done != last:
            progress(done, total, "workchain")
            last = done
        if done >= total:
            return
        if not get_manager().get_daemon_client().is_daemon_running:
            raise AutomatError(f"the daemon stopped with {total - done} of {total} WorkChains unfinished; start it "
                               "with `aiida-automat daemon start 2` and run again (they resume; finished ones are "
                               "reused)")
        time.sleep(poll_s)


def run_workchains(bench_dir, images, lib, *, k: int = 5, policy: str = "rules", llm: dict | None = None,
                   relax: bool = False, potential: str = "chgnet", progress: Callable | None = None,
                   poll_s: float = 2.0) -> dict:
    """Submit (or reuse) one WorkChain per manifest image and wait for all; image file → (pk, ``PipelineResult``)."""
    from aiida import orm
    from aiida.common.exceptions import InvalidOperation
    from aiida.engine import submit

    from ..data.stem_image import StemImageData
    from ..imaging.io import load_stem_image
    from ..profile import ensure_setup, load_code
    from ..workflows.reconstruction import ReconstructionWorkChain

    if policy not in ("rules", "llm"):
        raise AutomatError(f"the WorkChain runs an agent policy ('rules' or 'llm'), not {policy!r}")
    ensure_setup()
    bench_dir = pathlib.Path(bench_dir)
    record_path = bench_dir / RECORD
    record = _read_record(record_path)
    options = _options(lib, k, policy, llm, relax, potential)
    nodes = {im["file"]: _reusable(record.get(im["file"]), options) for im in images}
    todo = [im for im in images if nodes[im["file"]] is None]
    if todo or any(not n.is_terminated for n in nodes.values() if n is not None):
        check_daemon()
    if todo:
        lib_node = library_node(lib)
        code = load_code("automat") if relax else None
        model = None
        if relax and potential not in (None, "auto"):
            from ..data.model import ModelCheckpointData

            model = ModelCheckpointData.get_or_create(potential)
        policy_settings = {}
        if policy == "llm":  # never the API key: the daemon's workers read OPENAI_API_KEY themselves
            policy_settings = {key: llm[key] for key in ("model", "base_url", "timeout_s") if llm.get(key) is not None}
        for i, im in enumerate(todo):
            image_node = StemImageData(load_stem_image(bench_dir / im["file"]))
            image_node.label = im["file"][:255]
            image_node.store()
            builder = ReconstructionWorkChain.get_builder_from_protocol(
                image_node, protocol=PROTOCOL,
                overrides={"parameters": {"k": int(k), "relax": bool(relax), "dft": False}},
                library=lib_node, code=code, policy=policy, **policy_settings)
            if model is not None:
                builder.model = model
            builder.metadata.label = f"bench {im['file']}"[:255]
            builder.metadata.description = f"aiida-automat bench run --daemon: {bench_dir.resolve() / im['file']}"
            try:
                node = submit(builder)
            except InvalidOperation as exc:
                raise AutomatError(f"cannot submit: {str(exc).splitlines()[0]}; start the daemon with "
                                   "`aiida-automat daemon start 2`") from exc
            nodes[im["file"]] = node
            record[im["file"]] = {"pk": node.pk, "uuid": node.uuid, "options": options}
            _write_record(record_path, record)
            if progress:
                progress(i + 1, len(todo), "submitted")
    _wait([n.pk for n in nodes.values()], progress, poll_s)
    return {f: (n.pk, result_of_workchain(orm.load_node(n.pk))) for f, n in nodes.items()}


def daemon_span(pks) -> dict:
    """Throughput of the WorkChains: first creation to last change, and images per minute over that span.

    The figure to quote for the daemon: a worker interleaves its WorkChains (a step's calcfunction runs in
    a nested event loop, where other WorkChains' steps proceed), so a row's summed step times include
    other images' work whenever there are more WorkChains than workers.
    """
    from aiida import orm

    times = orm.QueryBuilder().append(orm.ProcessNode, filters={"id": {"in": list(pks)}},
                                      project=["ctime", "mtime"]).all()
    if not times:
        return {"n_workchains": 0, "span_s": None, "images_per_min": None}
    span = (max(m for _, m in times) - min(c for c, _ in times)).total_seconds()
    return {"n_workchains": len(times), "span_s": round(span, 3),
            "images_per_min": round(60.0 * len(times) / span, 3) if span > 0 else None}


def _trace(node) -> list:
    from .agent_loop import trace_line

    if "trace" not in node.outputs:
        return []
    return [trace_line(d["action"], d.get("arguments") or {}, d.get("policy")) for d in node.outputs.trace.get_list()]


def _timings(node) -> dict:
    """Seconds per stage, summed over the called steps (not the time the WorkChain waited for a worker, but
    including other WorkChains' steps a busy worker interleaved, see ``daemon_span``); ``total_s`` is their
    sum, ``wall_s`` the WorkChain's creation → last change."""
    from ..workflows.process_summary import stage_timings

    steps = stage_timings(node)
    out = {}
    for label, seconds in steps.items():
        key = STAGES.get(label, f"{label}_s")
        out[key] = out.get(key, 0.0) + seconds
    out["total_s"] = sum(steps.values())
    out["wall_s"] = (node.mtime - node.ctime).total_seconds()
    return out


def result_of_workchain(node) -> PipelineResult:
    """A terminated ``ReconstructionWorkChain`` as the ``PipelineResult`` the in-process pipeline returns."""
    from ..data.structures import structure_to_atoms
    from ..workflows.process_summary import alternatives, failure_reasons

    out = node.outputs
    res = PipelineResult(timings=_timings(node), trace=_trace(node))
    if "lattice" in out:
        lat = out.lattice.get_dict()
        res.lattice = {"a": float(lat["a_A"]), "b": float(lat["b_A"]), "gamma": float(lat["gamma_deg"])}
    if "retrieval" in out:
        ranked = sorted(out.retrieval.get_dict().get("candidates", []), key=lambda c: c["rank"])
        res.candidate_ids = [str(c["template_id"]) for c in ranked]
    elif any(line.startswith("retrieve(") for line in res.trace):  # given templates, named t0, t1, ... in order
        keys = [link.link_label.split("__", 1)[1]
                for link in node.base.links.get_incoming(link_label_filter="templates__%").all()]
        res.candidate_ids = sorted(keys, key=lambda s: int(s[1:]) if s[1:].isdigit() else s)
    if "structure" in out:
        res.relaxed = "relaxed_structure" in out
        res.atoms = structure_to_atoms(out.relaxed_structure if res.relaxed else out.structure)
        res.template_id = str(out.template.base.extras.get("template_id", out.template.label))
        if "verification" in out:
            res.score = float(out.verification["ranking_score"])
        outgoing = {link.link_label: link.node for link in node.base.links.get_outgoing().all()}
        by_uuid = {n.uuid: n for n in outgoing.values()}
        for alt in alternatives(outgoing):  # as the in-process loop: template id -> structure
            res.alternatives[alt["template_id"]] = structure_to_atoms(by_uuid[alt["uuid"]])
    status = node.exit_status
    if node.is_excepted or node.is_killed:
        lines = [line for line in (node.exception or "").strip().splitlines() if line.strip()]
        res.error = f"WorkChain<{node.pk}> {node.process_state.value}: {lines[-1] if lines else ''}".strip()
        res.atoms = None
    elif status == 430:  # the structure stands, unrelaxed, as in the in-process pipeline
        res.error = f"relaxation: {node.exit_message}"
    elif status:
        res.atoms = None
        res.error = f"exit {status}: {node.exit_message}{failure_reasons(node)}"
        if status in (320, 400):
            res.stage = "lattice"
        elif status in (401, 402) and not res.candidate_ids:
            res.stage = "retrieval"
        else:
            res.stage = "reconstruction"
    return res

