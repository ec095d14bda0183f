"""Benchmark: lattice measurement and atom columns (accuracy, robustness, speed, real images).

    .venv/bin/python benchmarks/lattice.py [--quick]

Prints markdown tables: lattice error (%) and column RMSE (Å) vs dose and rotation on synthetic images
with known truth (Gaussian-blob model, ``tests/core/_synthetic.py``), lattice error on images from
``imaging.simulate`` (fast model, and multislice without ``--quick``), our columns against atomap's on
the same image, and the real MoS2 images. Times are CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import numpy as np
from scipy.spatial import cKDTree

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "core"))

from _synthetic import blob_image, mos2  # noqa: E402

from aiida_automat.errors import AutomatError  # noqa: E402
from aiida_automat.imaging.image import StemImage  # noqa: E402
from aiida_automat.imaging.microscope import Microscope  # noqa: E402
from aiida_automat.lattice.distortion import estimate_distortion  # noqa: E402
from aiida_automat.lattice.measure import measure_lattice  # noqa: E402
from aiida_automat.reconstruct.columns import find_columns  # noqa: E402
from aiida_automat.reconstruct.lattice_fit import fit_lattice  # noqa: E402

A = 3.18


def rmse(pos_px, truth_px, pixel):
    d, _ = cKDTree(truth_px).query(pos_px)
    return float(np.sqrt(np.mean(d**2)) * pixel)


def synthetic_table(quick):
    doses = [None, 1e5, 2e4, 5e3] if not quick else [None, 2e4, 5e3]
    rots = [0.0, 17.0, 45.0] if not quick else [0.0, 17.0]
    print("\n### Synthetic (Gaussian columns, 256², 0.1 Å/px, MoS2 a = 3.18 Å)\n")
    print("| dose e/Å² | rotation ° | a error % | γ − 120 ° | columns good/all | column RMSE Å | t lattice s | t columns s |")
    print("|---|---|---|---|---|---|---|---|")
    for dose in doses:
        for rot in rots:
            im, truth, _ = blob_image(rotation_deg=rot, dose_e_per_A2=dose, rng=np.random.default_rng(7))
            t0 = time.process_time()
            lat = measure_lattice(im)
            t1 = time.process_time()
            cols = find_columns(im, lat)
            t2 = time.process_time()
            g = cols.good
            print(f"| {dose or '∞'} | {rot:g} | {100 * (lat.a_A / A - 1):+.3f} | {lat.gamma_deg - 120:+.3f} | "
                  f"{g.sum()}/{len(cols)} | {rmse(cols.positions_px[g], truth, 0.1):.4f} | {t1 - t0:.2f} | {t2 - t1:.2f} |")


def simulated_table(quick):
    try:
        from aiida_automat.imaging.simulate import simulate_image
    except ImportError:
        print("\n(imaging.simulate not available: simulated-image table skipped)")
        return
    mic = Microscope(mode="haadf", voltage_kV=60.0, semiangle_mrad=30.0)
    cases = [("fast", 0.0, None), ("fast", 23.0, 2e4), ("fast", 23.0, 5e3)]
    if not quick:
        cases += [("multislice", 11.0, None), ("multislice", 11.0, 2e4)]
    print("\n### Simulated (imaging.simulate, HAADF 60 kV 30 mrad, 256², 0.1 Å/px)\n")
    print("| method | rotation ° | dose e/Å² | a error % | γ − 120 ° | good columns | lattice-fit a Å | fit rms residual Å | t sim s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, rot, dose in cases:
        t0 = time.process_time()
        try:
            im = simulate_image(mos2(), mic, pixel_size_A=0.1, shape=(256, 256), rotation_deg=rot, method=method,
                                dose_e_per_A2=dose, rng=np.random.default_rng(3))
        except Exception as exc:  # noqa: BLE001 - report, do not stop the benchmark
            print(f"| {method} | {rot:g} | {dose or '∞'} | simulation failed: {type(exc).__name__}: {exc} |||||")
            continue
        ts = time.process_time() - t0
        try:
            lat = measure_lattice(im)
            cols = find_columns(im, lat)
            fit = fit_lattice(cols, lat)
            print(f"| {method} | {rot:g} | {dose or '∞'} | {100 * (lat.a_A / A - 1):+.3f} | {lat.gamma_deg - 120:+.3f} | "
                  f"{cols.good.sum()} | {fit.a_A:.4f} ± {fit.a_sigma_A:.4f} | {fit.rms_residual_A:.4f} | {ts:.1f} |")
        except AutomatError as exc:
            print(f"| {method} | {rot:g} | {dose or '∞'} | {type(exc).__name__}: {exc} ||||| {ts:.1f} |")


def atomap_table():
    print("\n### Ours vs atomap (same image: synthetic, 17°, dose 2·10⁴ e/Å², 256²)\n")
    im, truth, _ = blob_image(rotation_deg=17.0, dose_e_per_A2=2e4, rng=np.random.default_rng(7))
    t0 = time.process_time()
    lat = measure_lattice(im)
    cols = find_columns(im, lat)
    t_ours = time.process_time() - t0
    inner = cols.good
    print("| method | columns | RMSE Å (all returned) | RMSE Å (ours: good / atomap: same set) | CPU s |")
    print("|---|---|---|---|---|")
    print(f"| aiida-automat (FFT lattice + batched Gaussian mixture) | {len(cols)} | "
          f"{rmse(cols.positions_px[~cols.edge], truth, 0.1):.4f} | {rmse(cols.positions_px[inner], truth, 0.1):.4f} | {t_ours:.2f} |")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import atomap.api as am
            import hyperspy.api as hs
    except Exception as exc:  # noqa: BLE001
        print(f"| atomap | not importable: {exc} ||||")
        return
    sep = int(0.45 * A / 0.1 * 0.9)
    s = hs.signals.Signal2D(np.asarray(im.data, dtype=float))
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk = am.get_atom_positions(s, separation=sep)
        sub = am.Sublattice(pk, image=s.data)
        sub.find_nearest_neighbors()
        sub.refine_atom_positions_using_center_of_mass(show_progressbar=False)
        sub.refine_atom_positions_using_2d_gaussian(show_progressbar=False)
    t_am = time.process_time() - t0
    pos = np.stack([sub.y_position, sub.x_position], axis=1)
    m = 10
    ok = (pos[:, 0] > m) & (pos[:, 1] > m) & (pos[:, 0] < 256 - m) & (pos[:, 1] < 256 - m)
    print(f"| atomap (get_atom_positions sep={sep} px → CoM → 2D Gaussian) | {len(pos)} | {rmse(pos, truth, 0.1):.4f} | "
          f"{rmse(pos[ok], truth, 0.1):.4f} (interior) | {t_am:.2f} |")


def real_table():
    shared = ROOT.parent / "shared" / "data" / "real"
    if not shared.is_dir():
        print("\n(../shared/data absent: real-image table skipped)")
        return
    mic = Microscope(mode="haadf", voltage_kV=60.0, semiangle_mrad=30.0)
    ims = []
    try:
        import rsciio.digitalmicrograph as dm

        d = dm.file_reader(str(shared / "mos2_temul" / "example_Se_implanted_MoS2.dm3"))[0]
        ims.append(("TEMUL dm3 (1024², metadata 0.1270 Å/px)", StemImage(d["data"], 10 * d["axes"][0]["scale"], microscope=mic)))
    except Exception as exc:  # noqa: BLE001
        print(f"(dm3 not readable: {exc})")
    for name, fov in [("MoS2_stem_Exp-000-2", 90.0), ("MoS2_stem_Exp-001-5", 70.0)]:
        ims.append((f"SciLink {name} (512², FOV {fov:g} Å)", StemImage(np.load(shared / "mos2_scilink" / f"{name}.npy"), fov / 512, microscope=mic)))
    print("\n### Real HAADF images of MoS2 (expected a = 3.16–3.19 Å; reference used: a = 3.175 Å)\n")
    print("| image | a, b (claimed px) Å | γ ° | SNR | indexed | periodicity | anisotropy % (angle °) | implied px Å (y, x) | calibration error % | columns good/all | fit a (corrected) Å | fit γ ° | fit rms Å | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, im in ims:
        t0 = time.process_time()
        lat = measure_lattice(im)
        dist = estimate_distortion(lat, expected_a_A=3.175)
        cols = find_columns(im, lat)
        fit = fit_lattice(cols, lat, distortion=dist)
        t = time.process_time() - t0
        py, px = dist.implied_pixel_size_A
        print(f"| {name} | {lat.a_A:.3f}, {lat.b_A:.3f} | {lat.gamma_deg:.2f} | {lat.peak_snr:.0f} | {lat.n_indexed} | {lat.periodicity:.2f} | "
              f"{dist.anisotropy_pct:.1f} ({dist.principal_angle_deg:.0f}) | {py:.4f}, {px:.4f} | {dist.calibration_error_pct:+.1f} | "
              f"{cols.good.sum()}/{len(cols)} | {fit.a_A:.3f} ± {fit.a_sigma_A:.3f} | {fit.gamma_deg:.2f} | {fit.rms_residual_A:.3f} | {t:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases, no multislice")
    args = ap.parse_args()
    synthetic_table(args.quick)
    simulated_table(args.quick)
    atomap_table()
    real_table()


if __name__ == "__main__":
    main()
