"""Retrieval alone over every image of a finished `bench run`: where does the true formula rank?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_pass.py BENCH_DIR [--short N] [--k 10]
        [--workers 2] [--json F]

The pipeline verifies the top k candidates, so a retrieval change is judged by whether the truth's formula
reaches them — in ~2 minutes for 480 images instead of a 27-minute pipeline run. Per image: measured lattice,
``retrieve(k)``, the rank of the first candidate with the true reduced formula, the retrieval time. ``--short``
overrides the phase stage's short list (``library.retrieve.N_SHORT``) to measure that trade-off; compare two
``--json`` outputs to see which images moved. The run's own library file is used (``bench.run.run_library``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_STATE: dict = {}


def _init(bench: str, short: int | None) -> None:
    """Per worker: the short list to measure, and the run's library (inherited where workers fork)."""
    from aiida_automat.bench.run import run_library
    from aiida_automat.library import retrieve as R

    if short:
        R.N_SHORT = short
    if "lib" not in _STATE:
        _STATE["lib"] = run_library(pathlib.Path(bench))


def _one(args) -> dict:
    from pymatgen.core import Composition

    from aiida_automat.errors import AutomatError
    from aiida_automat.imaging.io import load_stem_image
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.library.retrieve import retrieve

    path, truth_formula, k = args
    lib = _STATE["lib"]
    img = load_stem_image(path)
    try:
        lat = measure_lattice(img)
        t0 = time.perf_counter()
        res = retrieve(img, lib, lattice=lat, k=k)
        dt = time.perf_counter() - t0
    except AutomatError as exc:
        return {"image": pathlib.Path(path).stem, "error": f"{type(exc).__name__}: {exc}"[:200]}
    want = Composition(truth_formula).reduced_formula
    forms = [Composition(c.formula).reduced_formula for c in res.candidates]
    rank = next((i + 1 for i, f in enumerate(forms) if f == want), None)
    return {"image": pathlib.Path(path).stem, "rank": rank, "ids": [c.template_id for c in res.candidates],
            "seconds": round(dt, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=pathlib.Path)
    ap.add_argument("--short", type=int, default=None, help="phase-stage short list (default: N_SHORT)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    from aiida_automat.bench.run import run_library

    try:  # here, not in the workers: a missing library is a one-line message, not a broken pool
        _STATE["lib"] = run_library(args.bench)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    manifest = json.loads((args.bench / "manifest.json").read_text())
    formula = {s["id"]: s["formula"] for s in manifest["structures"]}
    images = sorted((args.bench / "images").glob("*.npz"))
    jobs = [(str(p), formula[p.stem.split("_")[0]], args.k) for p in images]
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(str(args.bench), args.short)) as pool:
        rows = list(pool.map(_one, jobs, chunksize=4))
    ranks = [r.get("rank") for r in rows]
    times = [r["seconds"] for r in rows if "seconds" in r]
    print(f"{len(rows)} images: truth formula top-1 {sum(r == 1 for r in ranks)}, top-5 "
          f"{sum(1 for r in ranks if r and r <= 5)}, top-{args.k} {sum(1 for r in ranks if r)}; "
          f"errors {sum('error' in r for r in rows)}; median {np.median(times):.2f} s per retrieval")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
