"""A finished `bench run` as the offline re-choice scripts read it (``contrast_selection``, ``blur_selection``,
``merit_selection``): its library, the reduced formula of every template, and the pipeline rows that recorded
candidate scores, with each image's true reduced formula; and the agent's choice re-made from those scores with a
script's own scoring, the one piece every re-choice shares."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass


@dataclass
class RecordedRun:
    library: object
    formula: dict  # template id -> reduced formula
    rows: list  # pipeline rows with candidate scores
    truth: dict  # image file -> reduced formula of the true structure


_LIBRARIES: dict = {}


def library(bench: pathlib.Path):
    """The run's library, loaded once per process; worker processes forked after ``load_recorded_run`` share it."""
    key = str(bench)
    if key not in _LIBRARIES:
        from aiida_automat.bench.run import run_library

        _LIBRARIES[key] = run_library(pathlib.Path(bench))
    return _LIBRARIES[key]


def load_recorded_run(bench: pathlib.Path, modes=None) -> RecordedRun:
    """``modes`` (a collection of mode names) keeps only those images; a missing library is a one-line exit."""
    from pymatgen.core import Composition

    try:
        lib = library(bench)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    formula = {str(t): Composition(str(f)).reduced_formula for t, f in zip(lib.ids, lib.formulas)}
    rows = [r for r in json.loads((bench / "results.json").read_text())["rows"]
            if r["pipeline"] == "pipeline" and r.get("candidate_scores") and (modes is None or r["mode"] in modes)]
    truth = {r["file"]: Composition(r["formula"]).reduced_formula for r in rows}
    return RecordedRun(lib, formula, rows, truth)


def choose(scores: dict, verification, *, floor: float | None = None, accept: float = 0.9) -> str | None:
    """The agent's choice (``AgentState.best_candidate``) among a row's recorded candidates (retrieval order, so
    ties go as in the run), each scored by ``verification(template_id, recorded)`` — a float, or None for a
    candidate that failed. ``floor`` replaces ``agent.state.RETRIEVAL_P_FLOOR`` for this choice only."""
    from aiida_automat.agent import state as agent_state

    cands = []
    for tid, v in scores.items():
        s = verification(tid, v)
        if s is None:
            cands.append(agent_state.Candidate(tid, tid, 1.0, status="failed"))
        else:
            cands.append(agent_state.Candidate(tid, tid, float(v.get("retrieval_p", 1.0)), status="verified",
                                               verification_score=float(s)))
    saved = agent_state.RETRIEVAL_P_FLOOR
    if floor is not None:
        agent_state.RETRIEVAL_P_FLOOR = floor  # AgentState.merit reads the module constant when called
    try:
        best = agent_state.AgentState(candidates=tuple(cands), accept_score=accept).best_candidate()
    finally:
        agent_state.RETRIEVAL_P_FLOOR = saved
    return None if best is None else cands[best].template_id


def strain_paid(v: dict) -> float:
    """The strain penalty a recorded candidate paid in its ranking score: recorded since session 10, when the ranking
    score began at the size-neutral NCC; older rows: the verification NCC minus the ranking score and the contrast
    penalty."""
    return v.get("strain_penalty", v["score"] - v["ranking_score"] - v.get("contrast_penalty", 0.0))


def robust_centre(values) -> tuple[float, float, float]:
    """Median, core width (1.4826 × median absolute deviation) and the fraction beyond 3 core widths."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    mu = float(np.median(x))
    core = 1.4826 * float(np.median(np.abs(x - mu)))
    return mu, core, float(np.mean(np.abs(x - mu) > 3 * core))


def changed(ok: dict, base: dict) -> tuple[list, list]:
    """Images (stems) right under ``ok`` but not ``base``, and the reverse."""
    import pathlib

    gain = sorted(pathlib.Path(f).stem for f in ok if ok[f] and not base[f])
    loss = sorted(pathlib.Path(f).stem for f in ok if base[f] and not ok[f])
    return gain, loss
