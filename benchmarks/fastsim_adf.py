"""Benchmark: fast annular (ADF/HAADF) model vs abTEM multislice, on the quantities retrieval uses.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/fastsim_adf.py [--quick] [--thick] [--slice 0.5]
        [--ids A,B] [--cache DIR] [--out docs/_sections/bench_simulation_adf.md] [--json results.json]

NCC of whole images hides the column-ratio error (a 2H-TaSe2 image with the wrong Ta/Se₂ ratio still
correlates at 0.99), so this measures, per structure and microscope, on ONE cell:

* the complex Fourier coefficients F_g of the cell image (g ≠ 0, |F_ms| ≥ 5 % of the strongest):
  the contrast scale s = ⟨|F_fast|·|F_ms|⟩/⟨|F_ms|²⟩ (fast/multislice brightness of the contrast), the
  relative error of |F_g| after removing s (median and max over reflections), the phase error (max,
  weighted to reflections ≥ 20 % of the strongest), and the relative L2 error ‖F_fast/s − F_ms‖/‖F_ms‖;
* per-column integrated intensities: the cell image above its minimum, integrated in a disc of radius
  min(0.7 Å, 0.45 × nearest column distance) around each projected column; reported as the ratio of
  every column to the brightest one (fast/multislice − 1, worst column) — e.g. Mo column / S₂ column.

Structures: ~20 monolayers from the bundled sets (TMDs, TaSe2, light, heavy, with and without atoms
stacked in one projected column), split into a training half (used to choose/fit the model) and a
held-out half. Multislice: ``imaging.simulate.multislice_cell_coefficients`` (abTEM, one orthogonal
cell), cached on disk per structure and microscope.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import pickle
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiida_automat.imaging import Microscope  # noqa: E402
from aiida_automat.imaging.fastsim import cell_fourier_coefficients, projected_columns  # noqa: E402
from aiida_automat.imaging.simulate import multislice_cell_coefficients  # noqa: E402

# template ids of the bundled library (standardised cells); (T) = training, (H) = held out
TRAIN = ["MoS2-44a10f28", "TaSe2-634a5756", "C2-fdcf3c57", "WSe2-3d52bc42", "Ga2Se2-6e158fda",
         "Bi2Se3-640d941f", "2dm-2994", "FeI2-e6c3fcb9", "Si2H2-8795ce3f", "2dm-2031"]
HELD_OUT = ["WS2-231d4b60", "MoSe2-a6703220", "TaSe2-14799dc8", "BN-0e329ca7", "NbSe2-53c8feaa",
            "Ga2S2-b8a536c9", "In2Se3-4bbe4bb6", "P4-af33e4ee", "2dm-7", "Lu2O2Br2-540236a7"]
# thick layers (atoms 2-15 Å apart along one projected column), from the pipeline benchmark's failures
THICK = ["2dm-3075", "2dm-3026", "2dm-4027", "2dm-2726", "2dm-5327", "2dm-5584", "2dm-3821", "2dm-4317",
         "2dm-6197", "2dm-3201", "2dm-3556"]
QUICK = ["MoS2-44a10f28", "TaSe2-634a5756", "C2-fdcf3c57", "WS2-231d4b60", "BN-0e329ca7", "Ga2S2-b8a536c9"]


def conditions(quick: bool) -> dict:
    """Microscopes: the pipeline's 80 kV / 30 mrad, plus 60 kV and the library's 300 kV / 25 mrad."""
    out = {
        "ADF 80 kV": Microscope(mode="adf", voltage_kV=80, semiangle_mrad=30),
        "HAADF 80 kV": Microscope(mode="haadf", voltage_kV=80, semiangle_mrad=30),
        "ADF 300 kV": Microscope(mode="adf", voltage_kV=300, semiangle_mrad=25),
    }
    if not quick:
        out["ADF 60 kV"] = Microscope(mode="adf", voltage_kV=60, semiangle_mrad=30)
        out["HAADF 300 kV"] = Microscope(mode="haadf", voltage_kV=300, semiangle_mrad=25)
    return out


def load_templates(ids):
    from aiida_automat.library.structures import load_structure_set

    wanted = set(ids)
    found = {t.template_id: t.atoms for t in load_structure_set() if t.template_id in wanted}
    missing = [i for i in ids if i not in found]
    if missing:
        raise SystemExit(f"template(s) not in the bundled sets: {', '.join(missing)}")
    return found


def cached_multislice(atoms, mic: Microscope, cache: pathlib.Path | None, slice_A: float = 2.0):
    if cache is None:
        return multislice_cell_coefficients(atoms, mic, slice_thickness_A=slice_A)
    h = hashlib.sha256(json.dumps(mic.as_dict(), sort_keys=True).encode())
    if slice_A != 2.0:
        h.update(f"slice {slice_A:g}".encode())
    h.update(np.round(atoms.positions, 5).tobytes())
    h.update(np.asarray(atoms.numbers).tobytes())
    h.update(np.round(atoms.cell[:], 5).tobytes())
    path = cache / f"{h.hexdigest()[:20]}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    c = multislice_cell_coefficients(atoms, mic, slice_thickness_A=slice_A)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(c))
    return c


def _hk(coeffs, lattice):
    return [tuple(v) for v in np.rint(coeffs.g_invA @ lattice.T).astype(int)]


def matched_coefficients(ms, fast, lattice):
    """(g, F_ms, F_fast) on the reflections both series hold.

    The multislice box is an orthogonal supercell, so its series also holds non-lattice frequencies
    (zero up to numerical noise): only integer (h, k) of the template cell are compared.
    """
    f_by = dict(zip(_hk(fast, lattice), fast.channels["image"]))
    frac = ms.g_invA @ lattice.T
    lattice_g = np.all(np.abs(frac - np.rint(frac)) < 1e-3, axis=1)
    rows = [(g, c, f_by[hk]) for g, c, hk, ok in zip(ms.g_invA, ms.channels["image"], _hk(ms, lattice), lattice_g)
            if ok and hk in f_by]
    g = np.array([r[0] for r in rows])
    return g, np.array([r[1] for r in rows]), np.array([r[2] for r in rows])


def columns(atoms):
    """Projected columns: (x, y) and the element string (e.g. 'S2', 'Mo'), as the fast model groups them."""
    out = []
    for xy, key in projected_columns(atoms):
        names = sorted(sym for sym, _ in key)
        out.append((xy, "".join(f"{s}{names.count(s) if names.count(s) > 1 else ''}" for s in dict.fromkeys(names))))
    return out


def column_intensities(g, coeff, atoms, cols, n: int = 48):
    """Integrated (image − min) in a disc around each column, from the cell's Fourier series."""
    lat = np.asarray(atoms.cell[:2, :2])
    u = (np.arange(n) + 0.5) / n
    U, V = np.meshgrid(u, u, indexing="ij")
    pts = np.stack([U.ravel(), V.ravel()], 1) @ lat
    img = (np.exp(2j * np.pi * pts @ g.T) @ coeff).real
    img = img - img.min()
    xy = np.array([c[0] for c in cols])
    nn = []
    for i, p in enumerate(xy):
        d = [np.linalg.norm((((q - p) @ np.linalg.inv(lat) + 0.5) % 1.0 - 0.5) @ lat) for j, q in enumerate(xy) if j != i]
        # the column's own periodic images count too
        d += [np.linalg.norm(lat[0]), np.linalg.norm(lat[1])]
        nn.append(min(d))
    radius = min(0.7, 0.45 * min(nn))
    out = []
    for p in xy:
        d = (((pts - p) @ np.linalg.inv(lat) + 0.5) % 1.0 - 0.5) @ lat
        out.append(float(img[np.hypot(d[:, 0], d[:, 1]) < radius].sum()))
    return np.array(out)


def measure(atoms, mic, cache, slice_A=2.0):
    t0 = time.perf_counter()
    ms = cached_multislice(atoms, mic, cache, slice_A)
    t_ms = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = cell_fourier_coefficients(atoms, mic)
    t_fast = time.perf_counter() - t0
    lattice = np.asarray(atoms.cell[:2, :2])
    g, fm, ff = matched_coefficients(ms, fast, lattice)
    nz = np.hypot(g[:, 0], g[:, 1]) > 1e-9
    dc_ratio = float((ff[~nz].real / fm[~nz].real)[0]) if (~nz).any() else float("nan")
    g, fm, ff = g[nz], fm[nz], ff[nz]
    amax = np.abs(fm).max()
    keep = np.abs(fm) >= 0.05 * amax
    strong = np.abs(fm) >= 0.2 * amax
    s = float(np.sum(np.abs(ff[keep]) * np.abs(fm[keep])) / np.sum(np.abs(fm[keep]) ** 2))
    rel = np.abs(ff[keep]) / s / np.abs(fm[keep]) - 1.0
    dphi = np.degrees(np.abs(np.angle(ff[strong] / fm[strong])))
    l2 = float(np.linalg.norm(ff / s - fm) / np.linalg.norm(fm))
    cols = columns(atoms)
    row = {"scale": s, "dc_ratio": dc_ratio, "amp_med": float(np.median(np.abs(rel))),
           "amp_max": float(np.abs(rel).max()), "phase_max": float(dphi.max()), "l2": l2,
           "t_ms": t_ms, "t_fast": t_fast, "columns": [c[1] for c in cols]}
    if len(cols) > 1:
        gg = np.vstack([np.zeros((1, 2)), g])
        im_ms = column_intensities(gg, np.concatenate([[0.0], fm]), atoms, cols)
        im_f = column_intensities(gg, np.concatenate([[0.0], ff]), atoms, cols)
        ref = int(np.argmax(im_ms))
        r_ms, r_f = im_ms / im_ms[ref], im_f / im_f[ref]
        err = r_f / np.maximum(r_ms, 1e-9) - 1.0
        valid = r_ms > 0.05  # columns that show at all
        worst = int(np.argmax(np.where(valid, np.abs(err), -1)))
        row.update(col_ref=cols[ref][1], col_worst=cols[worst][1], ratio_ms=float(r_ms[worst]),
                   ratio_fast=float(r_f[worst]), col_err=float(err[worst]) if valid[worst] else 0.0)
    return row


def run(ids, conds, cache, label="", slice_A=2.0):
    atoms = load_templates(ids)
    res = {}
    for name, mic in conds.items():
        for tid in ids:
            res[(name, tid)] = measure(atoms[tid], mic, cache, slice_A)
        print(f"<!-- {label} {name} done -->", file=sys.stderr, flush=True)
    return res


def table(res, ids, conds, train):
    lines = []
    for name in conds:
        lines.append(f"\n#### {name} ({conds[name].detector_inner_mrad:.0f}–{conds[name].detector_outer_mrad:.0f} mrad, "
                     f"{conds[name].semiangle_mrad:.0f} mrad probe)\n")
        lines.append("| structure | set | columns | contrast fast/ms | ‖ΔF‖/‖F‖ | \\|F\\| err med / max | phase err max (°) "
                     "| worst column ratio (vs brightest) ms → fast |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for tid in ids:
            r = res[(name, tid)]
            cr = (f"{r['col_worst']}/{r['col_ref']}: {r['ratio_ms']:.2f} → {r['ratio_fast']:.2f} ({100 * r['col_err']:+.0f} %)"
                  if "col_err" in r else "–")
            lines.append(f"| {tid} | {'T' if tid in train else 'H'} | {' '.join(sorted(set(r['columns'])))} | "
                         f"{r['scale']:.2f} | {r['l2']:.3f} | {100 * r['amp_med']:.0f} / {100 * r['amp_max']:.0f} % | "
                         f"{r['phase_max']:.1f} | {cr} |")
    return "\n".join(lines)


def summary(res, ids, conds, train):
    lines = ["| microscope | set | n | median ‖ΔF‖/‖F‖ | max ‖ΔF‖/‖F‖ | median \\|col ratio err\\| | max \\|col ratio err\\| "
             "| median phase err max (°) | contrast fast/ms (min–max) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in conds:
        for tag, sel in (("train", [t for t in ids if t in train]),
                         ("held out", [t for t in ids if t not in train and t not in THICK]),
                         ("thick", [t for t in ids if t in THICK])):
            rows = [res[(name, t)] for t in sel]
            if not rows:
                continue
            ce = [abs(r["col_err"]) for r in rows if "col_err" in r]
            l2 = [r["l2"] for r in rows]
            sc = [r["scale"] for r in rows]
            lines.append(f"| {name} | {tag} | {len(rows)} | {np.median(l2):.3f} | {np.max(l2):.3f} | "
                         f"{100 * np.median(ce):.0f} % | {100 * np.max(ce):.0f} % | "
                         f"{np.median([r['phase_max'] for r in rows]):.1f} | {min(sc):.2f}–{max(sc):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 structures, 3 microscopes")
    ap.add_argument("--cache", default="/tmp/fastsim_cache", help="multislice cache folder ('' = none)")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--json", default=None, help="write the per-structure rows here")
    ap.add_argument("--slice", type=float, default=2.0,
                    help="multislice slice thickness (Å); 0.5 is converged to < 1 %% for the thick layers")
    ap.add_argument("--thick", action="store_true", help="add the thick layers (THICK) to the structures")
    ap.add_argument("--ids", default=None, help="comma-separated template ids instead of the preset lists")
    args = ap.parse_args(argv)
    ids = QUICK if args.quick else TRAIN + HELD_OUT
    if args.thick:
        ids = ids + THICK
    if args.ids:
        ids = args.ids.split(",")
    conds = conditions(args.quick)
    cache = pathlib.Path(args.cache) if args.cache else None
    t0 = time.perf_counter()
    res = run(ids, conds, cache, slice_A=args.slice)
    text = ("\n### Fast annular model vs multislice, per reflection and per column\n\n"
            + summary(res, ids, conds, set(TRAIN)) + "\n" + table(res, ids, conds, set(TRAIN))
            + f"\n\n_fast model {np.median([r['t_fast'] for r in res.values()]) * 1e3:.0f} ms per cell (median); "
            f"total {time.perf_counter() - t0:.0f} s_\n")
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
