"""Compare two `aiida-automat bench run` results.json files image by image (the product pipeline).

    python benchmarks/compare_runs.py BEFORE/results.json AFTER/results.json

Prints success overall, at doses ≥ 10⁴ and 3·10³, per mode and dose, the "answer or a reported alternative"
rate (rows written since alternatives are recorded), failures by type and the images whose outcome changed.
"""

from __future__ import annotations

import collections
import json
import sys

import numpy as np


def _rate(rows, f=lambda r: r["success"]) -> str:
    k = sum(bool(f(r)) for r in rows)
    return f"{100 * k / max(len(rows), 1):.1f} % ({k}/{len(rows)})"


def main(argv=None):
    before_path, after_path = (argv or sys.argv[1:])[:2]
    before = {r["file"]: r for r in json.load(open(before_path))["rows"] if r["pipeline"] == "pipeline"}
    rows = [r for r in json.load(open(after_path))["rows"] if r["pipeline"] == "pipeline"]

    def alt(r):
        return r["success"] or r.get("truth_in_alternatives")

    print("success after", _rate(rows), "before", _rate([before[r["file"]] for r in rows if r["file"] in before]))
    print("answer or a reported alternative", _rate(rows, alt), "; images with alternatives",
          _rate(rows, lambda r: r.get("alternatives")), "; right answers with alternatives",
          _rate([r for r in rows if r["success"]], lambda r: r.get("alternatives")))
    hi = [r for r in rows if r["dose"] >= 1e4]
    lo = [r for r in rows if r["dose"] < 1e4]
    print("doses >= 1e4", _rate(hi), "/", _rate(hi, alt), "| below", _rate(lo), "/", _rate(lo, alt))
    for mode in sorted({r["mode"] for r in rows}):
        cells = []
        for d in sorted({r["dose"] for r in rows}):
            sel = [r for r in rows if r["mode"] == mode and r["dose"] == d]
            cells.append(f"{d:.0e}: {100 * np.mean([r['success'] for r in sel]):.0f} / {100 * np.mean([bool(alt(r)) for r in sel]):.0f} %")
        print(mode, " | ".join(cells))
    print("failures", dict(collections.Counter(r["failure"] for r in rows if not r["success"])))
    print("failures without the truth among the alternatives", dict(collections.Counter(r["failure"] for r in rows if not alt(r))))
    changed = [r for r in rows if r["file"] in before and r["success"] != before[r["file"]]["success"]]
    print(f"changed: {len(changed)}")
    for r in changed:
        print(f"  {r['file']}: {before[r['file']]['success']} -> {r['success']}")
    print(f"median s/image {np.median([r['timings']['total_s'] for r in rows]):.2f}")


if __name__ == "__main__":
    main()
