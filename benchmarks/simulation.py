"""Benchmark: multislice (abTEM) vs fast linear model — time per image and image agreement (NCC).

    .venv/bin/python benchmarks/simulation.py [--quick]

Prints markdown tables. Agreement runs at 80 kV (the usual voltage for 2D materials, and cheap);
timings at the default 300 kV microscope. Structures come from ../shared/data when present, otherwise
from ASE builders (then fewer than 10).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from aiida_automat.imaging import Microscope  # noqa: E402
from aiida_automat.imaging.simulate import clear_cache, simulate_image  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "structures"
# (file, index) of the monolayers used for agreement: TMDs, hBN, a III-VI, Janus/ternaries, oblique
PICKS = [
    ("mc2d_mounet2018", 123), ("mc2d_mounet2018", 225), ("mc2d_mounet2018", 224), ("mc2d_mounet2018", 125),
    ("mc2d_mounet2018", 136), ("mc2d_mounet2018", 10), ("mc2d_mounet2018", 22), ("mc2d_mounet2018", 47),
    ("mc2d_mounet2018", 171), ("2dmatpedia_subset", 494), ("2dmatpedia_subset", 722), ("mc2d_mounet2018", 3),
]


def ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def structures(quick: bool):
    from ase.build import graphene, mx2

    out = [("graphene (ASE)", graphene(a=2.46, vacuum=5.0))]
    if SHARED.is_dir():
        from ase.io import read

        cache = {}
        for fname, idx in PICKS[: 4 if quick else None]:
            if fname not in cache:
                cache[fname] = read(str(SHARED / f"{fname}.extxyz"), ":")
            at = cache[fname][idx]
            out.append((f"{at.get_chemical_formula(mode='reduce')} ({fname.split('_')[0]}#{idx})", at))
    else:
        out += [("MoS2 (ASE)", mx2("MoS2", "2H", a=3.18, thickness=3.19, vacuum=5.0)),
                ("WSe2 (ASE)", mx2("WSe2", "2H", a=3.28, thickness=3.34, vacuum=5.0)),
                ("hBN (ASE)", graphene(formula="BN", a=2.50, vacuum=5.0))]
    return out


def timing_table(quick: bool):
    from ase.build import mx2

    at = mx2("MoS2", "2H", a=3.18, thickness=3.19, vacuum=5.0)
    rows = []
    sizes = (256,) if quick else (256, 512)
    for mode in ("idpc", "haadf"):
        m = Microscope(mode=mode)  # 300 kV, 25 mrad
        for n in sizes:
            clear_cache()
            t0 = time.perf_counter()
            ms = simulate_image(at, m, shape=(n, n), pixel_size_A=0.1)
            t_ms = time.perf_counter() - t0
            t0 = time.perf_counter()
            simulate_image(at, m, shape=(n, n), pixel_size_A=0.1, rotation_deg=13.0, dose_e_per_A2=1e4,
                           rng=np.random.default_rng(0))
            t_cached = time.perf_counter() - t0
            simulate_image(at, m, shape=(n, n), pixel_size_A=0.1, method="fast")  # warm caches
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                fast = simulate_image(at, m, shape=(n, n), pixel_size_A=0.1, method="fast")
            t_fast = (time.perf_counter() - t0) / reps
            rows.append((mode, n, t_ms, t_cached, t_fast, ncc(ms.data, fast.data)))
    print("\n### Time per MoS2 image (300 kV, 25 mrad, 0.1 Å/px, 1 thread)\n")
    print("| mode | size | multislice, first (s) | multislice, cached cell + new rotation + dose (s) | fast (s) | NCC |")
    print("|---|---|---|---|---|---|")
    for mode, n, a, b, c, r in rows:
        print(f"| {mode} | {n}² | {a:.1f} | {b:.3f} | {c:.3f} | {r:.4f} |")


def agreement_table(quick: bool):
    modes = ("idpc", "haadf", "abf", "bf")
    results = {}
    times = {}
    for name, at in structures(quick):
        for mode in modes:
            m = Microscope(mode=mode, voltage_kV=80)
            kw = dict(pixel_size_A=0.1, shape=(128, 128), rotation_deg=7.0, offset_A=(0.4, 0.2))
            t0 = time.perf_counter()
            try:
                ms = simulate_image(at, m, **kw).data
            except Exception as exc:  # report, don't stop the table
                print(f"<!-- {name} {mode}: {exc} -->")
                continue
            times[(name, mode)] = time.perf_counter() - t0
            fast = simulate_image(at, m, method="fast", **kw).data
            results[(name, mode)] = (ncc(ms, fast), float(np.std(fast) / np.std(ms)))
        print(f"<!-- done {name} -->", flush=True)
    print("\n### Agreement fast vs multislice (80 kV, 25 mrad, 128² at 0.1 Å/px, rotated 7°)\n")
    print("NCC (fast/multislice contrast ratio in brackets)\n")
    print("| structure | " + " | ".join(modes) + " | multislice s (idpc/haadf) |")
    print("|---|" + "---|" * (len(modes) + 1))
    names = sorted({k[0] for k in results}, key=lambda s: [k[0] for k in results].index(s))
    for name in names:
        cells = []
        for mode in modes:
            if (name, mode) in results:
                r, amp = results[(name, mode)]
                cells.append(f"{r:.4f} ({amp:.2f})")
            else:
                cells.append("–")
        t = f"{times.get((name, 'idpc'), float('nan')):.1f}/{times.get((name, 'haadf'), float('nan')):.1f}"
        print(f"| {name} | " + " | ".join(cells) + f" | {t} |")
    print("| **median** | " + " | ".join(
        f"{np.median([results[k][0] for k in results if k[1] == mode]):.4f}" for mode in modes) + " | |")
    print("| **min** | " + " | ".join(
        f"{np.min([results[k][0] for k in results if k[1] == mode]):.4f}" for mode in modes) + " | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer structures, 256² only")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    agreement_table(args.quick)
    timing_table(args.quick)
    print(f"\n_total {time.perf_counter() - t0:.0f} s_")


if __name__ == "__main__":
    main()
