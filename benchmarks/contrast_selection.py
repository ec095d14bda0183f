"""Would an absolute-contrast term in the candidate choice help? Measured on a finished `bench run`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/contrast_selection.py BENCH_DIR [--modes adf] [--workers 2]
        [--json F]

The verification score is a normalised correlation: it cannot see that a look-alike's heavier columns (BiTeI
for Ca3SiBr2, Se for Ga) would make a calibrated image brighter than it is. For every pipeline row of an
intensity-calibrated image (units "fraction of incident beam") each verified candidate is reconstructed and
registered again exactly as the candidate loop does (``bench.pipeline.ranking_score``), and the absolute
contrast c = ⟨cell average, model⟩_w / ⟨model, model⟩_w (model in physical units at the fitted blur) is
recorded (``ranking_score``'s ``contrast``). Then, from the recorded scores only, the choice is re-made with

    merit = verification + λ·ln(p) − κ·(ln c − μ)²

for a grid of κ (μ: median ln c of the right answers), and the images that become right / wrong are counted.
The merit without the contrast term reproduces the run's choices (checked: 0 changes at κ = 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_LIB = None


def _library(bench: pathlib.Path):
    global _LIB
    if _LIB is None:
        from aiida_automat.library.index import TemplateLibrary

        files = sorted(bench.glob("library_*.npz"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise SystemExit(f"no library_*.npz in {bench}")
        _LIB = TemplateLibrary.load(files[-1])
    return _LIB


def _one(args):
    bench, row = args
    from aiida_automat.bench.pipeline import CANDIDATE_ERRORS, ranking_score
    from aiida_automat.reconstruct.pipeline import reconstruct
    from aiida_automat.errors import AutomatError
    from aiida_automat.imaging.io import load_stem_image
    from aiida_automat.lattice.measure import measure_lattice

    lib = _library(bench)
    ids = {str(t): i for i, t in enumerate(lib.ids)}
    img = load_stem_image(bench / row["file"])
    out = {}
    try:
        lat = measure_lattice(img)
    except AutomatError:
        return row["file"], out
    for tid, v in (row.get("candidate_scores") or {}).items():
        if not isinstance(v, dict) or "ranking_score" not in v or tid not in ids:
            continue
        try:
            rec = reconstruct(img, lib.atoms(ids[tid]), lat.vectors_px)
            out[tid] = ranking_score(img, lat.vectors_px, rec)["contrast"]
        except CANDIDATE_ERRORS:
            pass
    return row["file"], out


def _choose(cs: dict, contrasts: dict, kappa: float, mu: float, accept: float = 0.9):
    from aiida_automat.agent.state import RETRIEVAL_WEIGHT

    best = best_m = None
    for tid, v in cs.items():  # candidate order = retrieval order, ties keep the earlier one (as the agent)
        if not isinstance(v, dict) or v.get("ranking_score", -1) < accept:
            continue
        p = min(max(float(v.get("retrieval_p", 1.0)), 1e-6), 1.0)
        m = v["ranking_score"] + RETRIEVAL_WEIGHT * math.log(p)
        c = contrasts.get(tid)
        if kappa and c and c > 0:
            m -= kappa * (math.log(c) - mu) ** 2
        if best_m is None or m > best_m + 1e-3:
            best, best_m = tid, m
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=pathlib.Path)
    ap.add_argument("--modes", default="adf")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    from pymatgen.core import Composition

    lib = _library(args.bench)
    formula = {str(t): Composition(str(f)).reduced_formula for t, f in zip(lib.ids, lib.formulas)}
    rows = [r for r in json.loads((args.bench / "results.json").read_text())["rows"]
            if r["pipeline"] == "pipeline" and r["mode"] in args.modes.split(",") and r.get("candidate_scores")]
    with ProcessPoolExecutor(args.workers) as pool:
        contrasts = dict(pool.map(_one, [(args.bench, r) for r in rows]))
    right = [math.log(contrasts[r["file"]][r["template_id"]]) for r in rows
             if r["success"] and contrasts[r["file"]].get(r["template_id"], 0) > 0]
    mu, sd = float(np.median(right)), float(np.std(right))
    print(f"{len(rows)} images; ln c of the right answers: median {mu:+.3f}, sd {sd:.3f}, "
          f"5–95 % {np.percentile(right, 5):+.3f} … {np.percentile(right, 95):+.3f}")
    table = []
    for kappa in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2):
        gain, loss = [], []
        for r in rows:
            pick = _choose(r["candidate_scores"], contrasts[r["file"]], kappa, mu)
            ok = pick is not None and formula.get(pick) == Composition(r["formula"]).reduced_formula
            name = pathlib.Path(r["file"]).stem
            if ok and not r["success"]:
                gain.append(name)
            elif r["success"] and not ok:
                loss.append(name)
        table.append({"kappa": kappa, "gain": gain, "loss": loss})
        print(f"kappa {kappa:<6g} right +{len(gain)}  wrong +{len(loss)}  {gain} {loss}")
    if args.json:
        args.json.write_text(json.dumps({"mu": mu, "sd": sd, "contrasts": contrasts, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
