"""Reconstruction benchmark (issue #5): multislice images → structure, with the true template given.

For each structure: abTEM multislice (one cell, band-limited rendering), random rotation, random biaxial
strain in ±2 %, random offset, Poisson dose noise; then lattice measurement and reconstruction with the
(unstrained) true structure as the template ("oracle template": isolates reconstruction from retrieval).
Scores: StructureMatcher success (ltol 0.2, stol 0.3, angle 5) against the true *strained* structure,
projected RMSD (Å) of matched sites, lattice error (%), time per candidate.

    .venv/bin/python benchmarks/reconstruct.py --n 20 --modes idpc,haadf --doses 5e3,1e4,3e4,6e4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "structures"


def pick_structures(n: int, seed: int, max_atoms: int = 12):
    from ase.io import read

    from aiida_automat.imaging.structures import validate_layer

    pool = []
    for name in ("mc2d_mounet2018.extxyz", "2dmatpedia_subset.extxyz"):
        path = SHARED / name
        if not path.exists():
            sys.exit(f"{path} is missing: this benchmark needs ../shared (developer checkouts and CI)")
        for atoms in read(path, index=":"):
            if len(atoms) <= max_atoms:
                try:
                    validate_layer(atoms)
                except Exception:  # noqa: BLE001
                    continue
                pool.append(atoms)
    rng = np.random.default_rng(seed)
    # tiers as AutoMat: unary / binary / ternary, equal shares
    tiers = {1: [], 2: [], 3: []}
    for atoms in pool:
        k = len(set(atoms.get_chemical_symbols()))
        if k in tiers:
            tiers[k].append(atoms)
    chosen = []
    for k in (1, 2, 3):
        idx = rng.permutation(len(tiers[k]))[: max(1, n // 3)]
        chosen += [tiers[k][i] for i in idx]
    return chosen[:n]


def strained(atoms, eps):
    out = atoms.copy()
    cell = out.cell.array.copy()
    cell[:2, :2] *= 1.0 + eps
    out.set_cell(cell, scale_atoms=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=18)
    parser.add_argument("--modes", default="idpc,haadf")
    parser.add_argument("--doses", default="5e3,1e4,3e4,6e4")
    parser.add_argument("--voltage", type=float, default=80.0)
    parser.add_argument("--pixel-size", type=float, default=0.1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--only", default=None,
                        help="comma-separated reduced formulas to run (the random draws of the others are still "
                             "made, so each image is the one the full run makes)")
    parser.add_argument("--report-only", type=pathlib.Path, default=None,
                        help="re-print the table of a --json file of an earlier run, simulating nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        report(json.loads(args.report_only.read_text()), args)
        return

    from aiida_automat.bench.metrics import compare
    from aiida_automat.errors import AutomatError
    from aiida_automat.imaging import Microscope
    from aiida_automat.imaging.simulate import simulate_image
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.reconstruct.pipeline import reconstruct

    structures = pick_structures(args.n, args.seed)
    rng = np.random.default_rng(args.seed)
    doses = [float(d) for d in args.doses.split(",")]
    rows = []
    only = None if args.only is None else set(args.only.split(","))
    for si, atoms in enumerate(structures):
        formula = atoms.get_chemical_formula(mode="reduce")
        for mode in args.modes.split(","):
            m = Microscope(mode=mode, voltage_kV=args.voltage, semiangle_mrad=30.0)
            eps = float(rng.uniform(-0.02, 0.02))
            rot = float(rng.uniform(0, 360))
            off = tuple(rng.uniform(0, 5, size=2))
            t_sim = time.perf_counter()
            for dose in doses:
                noise_seed = int(rng.integers(1 << 30))
                if only is not None and formula not in only:
                    continue
                try:
                    img = simulate_image(atoms, m, pixel_size_A=args.pixel_size, shape=(args.size, args.size),
                                         rotation_deg=rot, offset_A=off, strain=eps, method="multislice",
                                         dose_e_per_A2=dose, rng=np.random.default_rng(noise_seed))
                except AutomatError as exc:
                    rows.append({"formula": formula, "mode": mode, "dose": dose, "error": f"simulation: {exc}"})
                    continue
                sim_s = time.perf_counter() - t_sim
                t0 = time.perf_counter()
                row = {"formula": formula, "natoms": len(atoms), "nspecies": len(set(atoms.get_chemical_symbols())),
                       "mode": mode, "dose": dose, "strain": eps, "rotation": rot, "sim_s": sim_s}
                try:
                    lat = measure_lattice(img)
                    rec = reconstruct(img, atoms, lat.vectors_px)
                    match = compare(strained(atoms, eps), rec.atoms)
                    row.update(success=match.success, rmsd_A=match.projected_rmsd_A, lattice_err_pct=match.lattice_error_pct,
                               confidence=rec.confidence, formula_ok=match.formula_ok)
                except AutomatError as exc:
                    row.update(success=False, error=f"{type(exc).__name__}: {exc}")
                row["time_s"] = time.perf_counter() - t0
                rows.append(row)
                t_sim = time.perf_counter()
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    report(rows, args)


def _p90(x):
    return np.percentile(x, 90)


def _stat(values, fn, fmt):
    return format(fn(values), fmt) if values else "nan"


def report(rows, args):
    print(f"\n### Reconstruction with the true template (multislice, {args.voltage:g} kV, {args.pixel_size} Å/px, "
          f"{args.size}², ±2 % strain, random rotation)\n")
    print("| mode | dose (e/Å²) | n | success | projected RMSD mean / median / 90th pct (Å) | lattice error mean / 90th pct / max (%) | time / candidate median (s) |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for dose in sorted({r["dose"] for r in rows}):
            sel = [r for r in rows if r["mode"] == mode and r["dose"] == dose]
            if not sel:
                continue
            ok = [r for r in sel if r.get("success")]
            rmsd = [r["rmsd_A"] for r in ok if r.get("rmsd_A") is not None]
            lat = [r["lattice_err_pct"] for r in sel if r.get("lattice_err_pct") is not None]
            times = [r["time_s"] for r in sel if "time_s" in r]
            print(f"| {mode} | {dose:.0e} | {len(sel)} | {100 * len(ok) / len(sel):.1f} % | "
                  f"{_stat(rmsd, np.mean, '.4f')} / {_stat(rmsd, np.median, '.4f')} / {_stat(rmsd, _p90, '.4f')} | "
                  f"{_stat(lat, np.mean, '.3f')} / {_stat(lat, _p90, '.3f')} / {_stat(lat, np.max, '.3f')} | "
                  f"{np.median(times) if times else float('nan'):.2f} |")
    fails = [r for r in rows if not r.get("success")]
    if fails:
        print("\nFailures:")
        for r in fails:
            print(f"- {r['formula']} {r['mode']} {r['dose']:.0e}: {r.get('error', 'no match')}"
                  f" (lattice err {r.get('lattice_err_pct')})")


if __name__ == "__main__":
    main()
