"""A finished `bench run` as the offline re-choice scripts read it (``contrast_selection``, ``blur_selection``,
``merit_selection``): its library, the reduced formula of every template, and the pipeline rows that recorded
candidate scores, with each image's true reduced formula."""

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


def load_recorded_run(bench: pathlib.Path, modes=None) -> RecordedRun:
    """``modes`` (a collection of mode names) keeps only those images; a missing library is a one-line exit."""
    from pymatgen.core import Composition

    from aiida_automat.bench.run import run_library

    try:
        lib = run_library(bench)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    formula = {str(t): Composition(str(f)).reduced_formula for t, f in zip(lib.ids, lib.formulas)}
    rows = [r for r in json.loads((bench / "results.json").read_text())["rows"]
            if r["pipeline"] == "pipeline" and r.get("candidate_scores") and (modes is None or r["mode"] in modes)]
    truth = {r["file"]: Composition(r["formula"]).reduced_formula for r in rows}
    return RecordedRun(lib, formula, rows, truth)
