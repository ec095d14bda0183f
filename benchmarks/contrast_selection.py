"""Would an absolute-contrast term in the candidate choice help? Measured on a finished `bench run`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/contrast_selection.py BENCH_DIR [--modes adf] [--workers 2]
        [--json F]

The verification score is a normalised correlation: it cannot see that a look-alike's heavier columns (BiTeI
for Ca3SiBr2, Se for Ga) would make a calibrated image brighter than it is. For every pipeline row of an
intensity-calibrated image (units "fraction of incident beam") the absolute contrast c of each verified
candidate (``reconstruct.scoring.candidate_score``: least-squares image/model scale of the lattice harmonics,
model in beam fractions at the fitted blur) is taken from the row where the run recorded it, or else the
candidate is reconstructed and scored again exactly as the candidate loop does. Then, from the recorded scores
only, the choice is re-made with

    merit = verification + λ·ln(p) − λ·(−ln[(1 − f)·exp(−½z²) + ε]),   z = (ln c − μ)/σ

(λ = ``RETRIEVAL_WEIGHT``, the form ``candidate_score`` uses, ε = max(f·σ·√(2π), 10⁻⁶); the verification is
taken without any contrast penalty the run applied) for μ = median ln c of the right answers and a grid of σ,
Gaussian (f = 0) and robust (f = the right answers' fraction beyond 3 core widths, core width = 1.4826 × their
median absolute deviation), and the images whose answer changes formula (right ↔ wrong) against the same
re-choice without the term are listed.
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
sys.path.insert(0, str(ROOT / "benchmarks"))


def _one(args):
    bench, row = args
    from aiida_automat.bench.pipeline import CANDIDATE_ERRORS, ranking_score
    from aiida_automat.errors import AutomatError
    from aiida_automat.imaging.io import load_stem_image
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.reconstruct.pipeline import reconstruct
    from _recorded import library

    scores = {t: v for t, v in (row.get("candidate_scores") or {}).items() if "ranking_score" in v}
    out = {t: v["contrast"] for t, v in scores.items() if "contrast" in v}
    if len(out) == len(scores):
        return row["file"], out
    lib = library(bench)
    ids = {str(t): i for i, t in enumerate(lib.ids)}
    img = load_stem_image(bench / row["file"])
    try:
        lat = measure_lattice(img)
    except AutomatError:
        return row["file"], out
    for tid in scores:
        if tid in out or tid not in ids:
            continue
        try:
            rec = reconstruct(img, lib.atoms(ids[tid]), lat.vectors_px)
            out[tid] = ranking_score(img, lat.vectors_px, rec)["contrast"]
        except CANDIDATE_ERRORS:
            pass
    return row["file"], out


def _verification(contrasts: dict, sigma: float | None, mu: float, outliers: float = 0.0):
    """Each candidate's verification without the run's contrast term, with one of spread ``sigma`` around ``mu``
    instead (none for ``sigma=None``)."""
    from aiida_automat.reconstruct.scoring import contrast_penalty

    def score(tid, v):
        if "ranking_score" not in v:
            return None
        s = v["ranking_score"] + v.get("contrast_penalty", 0.0)  # the verification without the run's term
        if sigma and contrasts.get(tid):
            s -= contrast_penalty(contrasts[tid], "", center=mu, sigma=sigma, outliers=outliers)
        return s

    return score


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=pathlib.Path)
    ap.add_argument("--modes", default="adf")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    from _recorded import changed, choose, load_recorded_run, robust_centre

    run = load_recorded_run(args.bench, modes=args.modes.split(","))  # loads the library the workers share
    formula, rows = run.formula, run.rows
    with ProcessPoolExecutor(args.workers) as pool:
        contrasts = dict(pool.map(_one, [(args.bench, r) for r in rows]))
    right = [math.log(contrasts[r["file"]][r["template_id"]]) for r in rows
             if r["success"] and contrasts[r["file"]].get(r["template_id"], 0) > 0]
    mu, core, tail = robust_centre(right)
    sd = float(np.std(right))
    print(f"{len(rows)} images; ln c of the right answers: median {mu:+.3f}, sd {sd:.3f}, "
          f"5–95 % {np.percentile(right, 5):+.3f} … {np.percentile(right, 95):+.3f}; "
          f"core width (1.4826 MAD) {core:.3f}, beyond 3 core widths {tail:.3f}")
    table = []
    right_formula = run.truth
    base = {r["file"]: formula.get(choose(r["candidate_scores"], _verification({}, None, mu))) == right_formula[r["file"]]
            for r in rows}
    grid = [(sigma, 0.0) for sigma in (0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15)]
    grid += [(sigma, tail) for sigma in (0.02, 0.03, 0.04, 0.05, 0.07)] + [(round(core, 3), tail)]
    for sigma, f in grid:
        gain, loss = [], []
        for r in rows:
            chosen = choose(r["candidate_scores"], _verification(contrasts[r["file"]], sigma, mu, f))
            ok = formula.get(chosen) == right_formula[r["file"]]
            name = pathlib.Path(r["file"]).stem
            if ok and not base[r["file"]]:
                gain.append(name)
            elif base[r["file"]] and not ok:
                loss.append(name)
        table.append({"sigma": sigma, "outliers": f, "gain": gain, "loss": loss})
        print(f"sigma {sigma:<5g} outliers {f:<5.3f} right +{len(gain)}  wrong +{len(loss)}  {gain} {loss}")
    if args.json:
        args.json.write_text(json.dumps({"mu": mu, "sd": sd, "core": core, "tail": tail, "contrasts": contrasts,
                                         "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
