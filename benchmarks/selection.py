"""How should the agent choose among verified look-alikes? Re-score a benchmark run's selection failures.

For every "selection" failure of a `bench run` (the right template was shortlisted, another one verified as
well or better) and every ``--control-every``-th success, the pipeline is run again in-process (fixed
policy: every top-k candidate reconstructed and verified) and the retrieval posterior recorded; then the
choice ``argmax verification + λ·ln p`` is evaluated for several λ:

    python benchmarks/selection.py /tmp/automat_bench/stem2mat-small --control-every 10
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections import Counter

LAMBDAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


def rescore(bench: pathlib.Path, control_every: int, k: int) -> list[dict]:
    from aiida_automat.bench.pipeline import run_pipeline
    from aiida_automat.bench.run import run_library
    from aiida_automat.imaging.io import load_stem_image
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.library.retrieve import retrieve

    results = json.loads((bench / "results.json").read_text())
    rows = [r for r in results["rows"] if r["pipeline"] == "pipeline"]
    chosen = [r for r in rows if r["failure"] == "selection"] + [r for r in rows if r["success"]][::control_every]
    library = run_library(bench)
    out = []
    for row in chosen:
        image = load_stem_image(bench / row["file"])
        res = run_pipeline(image, library, k=k)
        ret = retrieve(image, library, lattice=measure_lattice(image), k=k, propose_outside=False)
        out.append({"file": row["file"], "truth": row["id"], "success": row["success"],
                    "scores": {t: s["ranking_score"] for t, s in res.scores.items() if "ranking_score" in s},
                    "probs": {c.template_id: c.probability for c in ret.candidates}})
        print(f"{row['file']}: truth {row['id']}, chosen {res.template_id}", flush=True)
    return out


def choose(entry: dict, lam: float) -> str | None:
    best = None
    for tid, score in entry["scores"].items():
        p = min(max(entry["probs"].get(tid, 1e-6), 1e-6), 1.0)
        merit = score + lam * math.log(p)
        if best is None or merit > best[0]:
            best = (merit, tid)
    return None if best is None else best[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=pathlib.Path, help="a folder `bench run` has finished in")
    ap.add_argument("--control-every", type=int, default=10, help="also re-run every N-th success")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--json", type=pathlib.Path, default=None, help="write the re-scored entries here")
    args = ap.parse_args()
    entries = rescore(args.bench, args.control_every, args.k)
    if args.json:
        args.json.write_text(json.dumps(entries))
    n_fail = sum(not e["success"] for e in entries)
    n_ok = len(entries) - n_fail
    print(f"\n| λ | selection failures now right (of {n_fail}) | sampled successes changed (of {n_ok}) |")
    print("|---|---|---|")
    for lam in LAMBDAS:
        c = Counter((e["success"], choose(e, lam) == e["truth"]) for e in entries)
        base = {id(e): choose(e, 0.0) for e in entries}
        changed = sum(1 for e in entries if e["success"] and choose(e, lam) != base[id(e)])
        print(f"| {lam:g} | {c[(False, True)]} | {changed} |")


if __name__ == "__main__":
    main()
