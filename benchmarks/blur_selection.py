"""Should the verification's blur be one per image instead of one per candidate? Measured on a finished `bench run`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/blur_selection.py BENCH_DIR --curves F.json [--workers 2]

The ranking score fits the instrument blur (Gaussian σ, 0–1.5 Å) separately for every candidate
(``verify.best_blur``). With one or two reflection shells the blur trades against the pattern, so a look-alike
can buy the softening it needs (Be vs F2 in iDPC: the truth fits at 0.24 Å, F2 at 0.34 Å, and their NCCs end up
0.0008 apart). For every pipeline row this script reconstructs each verified candidate exactly as the candidate
loop does (``reconstruct`` then ``scoring.registered_candidate``) and records its verification NCC and absolute
contrast on a grid of blurs (``--curves``, reused when present). Then, from those curves and the run's other
recorded terms (strain penalty, retrieval posterior), the choice is re-made with

* ``per-candidate``: each candidate at its own best blur (what the run does; checks the curves reproduce it);
* ``joint``: one blur per image, the one maximising the summed NCC of the verified candidates;
* ``metadata``: one blur per image, the metadata's (0 for these simulations);

each with and without the contrast term, re-centred on the right answers' median ln c at that blur (core width and tail as
``benchmarks/contrast_selection.py`` measures them), and the images whose answer changes formula against the first line (per-candidate, contrast: the run's
own rule) are listed.
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

BLURS = np.round(np.arange(0.0, 1.5001, 0.02), 3)


def _curves(args):
    bench, row = args
    from aiida_automat.bench.pipeline import CANDIDATE_ERRORS
    from aiida_automat.errors import AutomatError
    from aiida_automat.imaging.io import load_stem_image
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.reconstruct.pipeline import reconstruct
    from aiida_automat.reconstruct.scoring import registered_candidate
    from aiida_automat.reconstruct.verify import _contrast, _ncc, best_blur, model_coefficients
    from _recorded import library

    lib = library(bench)
    ids = {str(t): i for i, t in enumerate(lib.ids)}
    img = load_stem_image(bench / row["file"])
    out = {}
    try:
        lat = measure_lattice(img)
    except AutomatError:
        return row["file"], out
    for tid, v in row["candidate_scores"].items():
        if "ranking_score" not in v or tid not in ids:
            continue
        try:
            rec = reconstruct(img, lib.atoms(ids[tid]), lat.vectors_px)
            cell, reg = registered_candidate(img, lat.vectors_px, rec.atoms)
        except CANDIDATE_ERRORS:
            continue
        models = [model_coefficients(reg, cell, b) for b in BLURS]
        out[tid] = {"ncc": [round(_ncc(cell, m), 6) for m in models],
                    "contrast": [float(f"{_contrast(cell, m):.6g}") for m in models],
                    "fit_blur": round(best_blur(reg, cell), 4)}
    return row["file"], out


def _verification(curve, blur_index, calib):
    """Each candidate's score with its NCC at ``blur_index[tid]``, the run's strain term, and the contrast term
    ``calib`` = (mu, σ, f) at that blur (none for ``calib=None``); None where no curve was recorded."""
    from _recorded import strain_paid

    from aiida_automat.reconstruct.scoring import contrast_penalty

    def score(tid, v):
        if tid not in curve:
            return None
        strain_pen = strain_paid(v)
        i = blur_index[tid]
        s = curve[tid]["ncc"][i] - strain_pen
        c = curve[tid]["contrast"][i]
        if calib is not None and c > 0:
            s -= contrast_penalty(c, "", center=calib[0], sigma=calib[1], outliers=calib[2])
        return s

    return score


def _indices(curve, strategy):
    if not curve:
        return {}
    if strategy == "per-candidate":
        return {t: int(np.argmax(c["ncc"])) for t, c in curve.items()}
    if strategy == "joint":
        j = int(np.argmax(np.sum([c["ncc"] for c in curve.values()], axis=0)))
    elif strategy == "metadata":
        j = 0
    else:
        raise ValueError(strategy)
    return {t: j for t in curve}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=pathlib.Path)
    ap.add_argument("--curves", type=pathlib.Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    from _recorded import changed, choose, load_recorded_run, robust_centre

    run = load_recorded_run(args.bench)  # loads the library the curve workers share
    formula, rows, truth = run.formula, run.rows, run.truth
    if args.curves.exists():
        curves = json.loads(args.curves.read_text())["curves"]
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            curves = dict(pool.map(_curves, [(args.bench, r) for r in rows], chunksize=4))
        args.curves.write_text(json.dumps({"blurs": BLURS.tolist(), "curves": curves}))
    for mode in ("adf", "idpc"):
        mrows = [r for r in rows if r["mode"] == mode and curves.get(r["file"])]
        base = None
        for strategy in ("per-candidate", "joint", "metadata"):
            idx = {r["file"]: _indices(curves[r["file"]], strategy) for r in mrows}
            # contrast calibration at this strategy's blur, from the candidates of the right formula
            lnc = [math.log(curves[r["file"]][t]["contrast"][idx[r["file"]][t]]) for r in mrows
                   for t in curves[r["file"]] if formula.get(t) == truth[r["file"]]
                   and curves[r["file"]][t]["contrast"][idx[r["file"]][t]] > 0]
            lnc = [x for x in lnc if abs(x) < 1.0]
            mu, core, tail = robust_centre(lnc)
            blur = [c["fit_blur"] for r in mrows for t, c in curves[r["file"]].items() if formula.get(t) == truth[r["file"]]]
            for label, calib in (("contrast", (mu, max(core, 0.01), tail)), ("no contrast", None)):
                ok = {r["file"]: formula.get(choose(r["candidate_scores"],
                                                    _verification(curves[r["file"]], idx[r["file"]], calib)))
                      == truth[r["file"]] for r in mrows}
                if base is None:  # per-candidate blur with the contrast term: what the run does
                    base = ok
                gain, loss = changed(ok, base)
                print(f"{mode:4s} {strategy:13s} {label:11s} right {sum(ok.values())}/{len(ok)}  "
                      f"ln c {mu:+.3f} core {core:.3f} tail {tail:.3f}  +{gain} -{loss}")
        print(f"{mode}: fitted blur of the right candidates: median {np.median(blur):.3f} Å, "
              f"5–95 % {np.percentile(blur, 5):.3f}–{np.percentile(blur, 95):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
