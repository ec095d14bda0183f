"""Why did the pipeline miss? The true template forced into retrieval and selection, image by image.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_misses.py BENCH_DIR [IMAGE ...]
        [--failures retrieval,selection] [--json F]

For each image (default: the pipeline rows of ``BENCH_DIR/results.json`` that failed at the stages given):

* the true template's rank among all lattice-compatible templates (``retrieve(k=400)``), and its amplitude /
  phase fit when it is forced into the short list (``retrieve(elements=<its elements>)``);
* the true template and the pipeline's answer reconstructed and verified exactly as the candidate loop does
  (``bench.pipeline.ranking_score``): if the truth verifies *worse* than the answer, better retrieval alone
  cannot make the image right.

The bench set's own library file (``library_*.npz``) is used, so the figures are those of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _library(bench: pathlib.Path):
    from aiida_automat.bench.run import run_library

    try:
        return run_library(bench)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None


def _verify(img, lat, atoms) -> float | None:
    from aiida_automat.bench.pipeline import CANDIDATE_ERRORS, ranking_score
    from aiida_automat.reconstruct.pipeline import reconstruct

    try:
        rec = reconstruct(img, atoms, lat.vectors_px)
        return round(ranking_score(img, lat.vectors_px, rec)["ranking_score"], 4)
    except CANDIDATE_ERRORS:
        return None


def analyse(bench: pathlib.Path, lib, name: str, answer: str | None) -> dict:
    from aiida_automat.errors import AutomatError
    from aiida_automat.imaging.io import load_stem_image
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.library.retrieve import retrieve

    truth = name.split("_")[0]
    ids = [str(i) for i in lib.ids]
    if truth not in ids:
        return {"image": name, "error": f"{truth} is not in the library"}
    t = ids.index(truth)
    img = load_stem_image(bench / "images" / f"{name}.npz")
    try:
        lat = measure_lattice(img)
        ranked = [c.template_id for c in retrieve(img, lib, lattice=lat, k=400).candidates]
        forced = retrieve(img, lib, lattice=lat, k=50, elements=",".join(str(lib.elements[t]).split()))
    except AutomatError as exc:
        return {"image": name, "error": f"{type(exc).__name__}: {exc}"}
    mine = next((c for c in forced.candidates if c.template_id == truth), None)
    row = {"image": name, "truth": str(lib.formulas[t]), "lattice_A": [round(v, 3) for v in (lat.a_A, lat.b_A, lat.gamma_deg)],
           "truth_rank": ranked.index(truth) + 1 if truth in ranked else None,
           "truth_forced": None if mine is None else {"chi2": round(mine.chi2_red, 3), "ncc": round(mine.ncc, 3),
                                                       "supercell": mine.supercell},
           "truth_verification": _verify(img, lat, lib.atoms(t))}
    if answer and answer in ids:
        row["answer"] = str(lib.formulas[ids.index(answer)])
        row["answer_verification"] = _verify(img, lat, lib.atoms(ids.index(answer)))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=pathlib.Path)
    ap.add_argument("images", nargs="*", help="image names without .npz (default: failed pipeline rows)")
    ap.add_argument("--failures", default="retrieval,selection")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    lib = _library(args.bench)
    answers = {}
    results = args.bench / "results.json"
    if results.exists():
        for r in json.loads(results.read_text())["rows"]:
            if r["pipeline"] in ("pipeline", "workchain"):
                answers[pathlib.Path(r["file"]).stem] = (r.get("template_id"), r.get("failure"))
    names = args.images or sorted(n for n, (_, f) in answers.items() if f in args.failures.split(","))
    rows = []
    for name in names:
        row = analyse(args.bench, lib, name, answers.get(name, (None, None))[0])
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
