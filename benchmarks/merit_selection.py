"""Would another floor on the retrieval posterior, or another strain term, choose better? Re-chosen offline.

    .venv/bin/python benchmarks/merit_selection.py BENCH_DIR [--floor 1e-3]

Every pipeline row of a finished `bench run` records, for each verified candidate, the verification NCC
(``score``), the ranking score, the contrast penalty and the retrieval posterior; the agent's choice
(``AgentState.best_candidate``: merit = ranking score + ``RETRIEVAL_WEIGHT``·ln max(p, floor), ties within 0.001
to the better retrieval rank) is a pure function of those, so variants are re-chosen exactly without running
anything again. The template strain each candidate needed follows from the recorded numbers (strain penalty =
score − ranking score − contrast penalty = ``STRAIN_WEIGHT``·(|ε| − ``STRAIN_FREE``) when positive).

Two scans, each listing the images whose answer changes formula (right ↔ wrong) against the first line:

* the posterior floor (``agent.state.RETRIEVAL_P_FLOOR``), 10⁻⁶ … 10⁻², with the run's strain term;
* the strain term (linear beyond a free band, or a Gaussian prior at 0.002 per nat), with ``--floor``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _strain_penalty_forms():
    from aiida_automat.reconstruct.verify import STRAIN_FREE, STRAIN_WEIGHT

    forms = {f"linear {STRAIN_WEIGHT} beyond {STRAIN_FREE} (the run's)":
             lambda e: STRAIN_WEIGHT * max(0.0, e - STRAIN_FREE)}
    for w in (0.25, 0.1, 0.0):
        forms[f"linear {w} beyond {STRAIN_FREE}"] = lambda e, w=w: w * max(0.0, e - STRAIN_FREE)
    for free in (0.01, 0.02):
        forms[f"linear {STRAIN_WEIGHT} beyond {free}"] = lambda e, f=free: STRAIN_WEIGHT * max(0.0, e - f)
    for sigma in (0.005, 0.01, 0.02, 0.03):
        forms[f"Gaussian, sigma {sigma}"] = lambda e, s=sigma: 0.002 * 0.5 * (e / s) ** 2
    return forms


def _verification(strain_penalty=None):
    """A candidate's ranking score as recorded, or with its strain term replaced by ``strain_penalty(|ε|)``."""
    from _recorded import strain_paid

    from aiida_automat.reconstruct.verify import STRAIN_FREE, STRAIN_WEIGHT

    def score(tid, v):
        if "ranking_score" not in v:
            return None
        if strain_penalty is None:
            return v["ranking_score"]
        paid = strain_paid(v)
        strain = paid / STRAIN_WEIGHT + STRAIN_FREE if paid > 1e-6 else 0.0
        return v["ranking_score"] + paid - strain_penalty(strain)

    return score


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=pathlib.Path)
    ap.add_argument("--floor", type=float, default=None, help="posterior floor for the strain scan (default: the "
                                                               "code's RETRIEVAL_P_FLOOR)")
    args = ap.parse_args(argv)
    from _recorded import changed, choose, load_recorded_run

    from aiida_automat.agent.state import RETRIEVAL_P_FLOOR

    run = load_recorded_run(args.bench)
    formula, rows, truth = run.formula, run.rows, run.truth

    def scan(title, variants):
        print(title)
        base = None
        for name, (floor, pen) in variants.items():
            verification = _verification(pen)
            ok = {r["file"]: formula.get(choose(r["candidate_scores"], verification, floor=floor)) == truth[r["file"]]
                  for r in rows}
            base = ok if base is None else base
            gain, loss = changed(ok, base)
            print(f"  {name:40s} right {sum(ok.values())}/{len(ok)}  +{len(gain)} {gain}  -{len(loss)} {loss}")

    scan("posterior floor (the run's strain term):",
         {f"floor {f:g}": (f, None) for f in (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)})
    floor = RETRIEVAL_P_FLOOR if args.floor is None else args.floor
    scan(f"strain term (floor {floor:g}):", {name: (floor, pen) for name, pen in _strain_penalty_forms().items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
