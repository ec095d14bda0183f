"""Denoiser benchmark: mixture of experts vs raw, Gaussian, non-local means and BM3D.

    python benchmarks/denoise.py [--n 6] [--checkpoint PATH] [--seed S]

Held-out simulated images (fast model, fresh seeds; six structures from the held-out tenth of the
training pool, ``HELD_OUT`` below, never seen by the network or the gate): iDPC and ADF at 80 kV / 30 mrad / source 0.3 Å, 256² at 0.1 Å/px,
random rotation and offset, doses 2·10³, 10⁴, 6·10⁴ e⁻/Å². Metrics against the noise-free image:
PSNR (data range = clean range), SSIM, and the RMS error of the refined column positions
(``find_columns`` on the denoised image, good columns matched to the true columns within 0.6 Å) with the
recall of interior true columns. ``moe`` is ``denoise(setting="auto")``, ``moe-strong`` is
``setting="strong"`` (Bragg expert weighted ≥ 0.5, aperiodic residual still kept). The Gaussian baseline is run at σ = 1, 1.5, 2, 3 px and the σ with the
lowest column RMSE in each row is reported (an oracle choice, in the baseline's favour). Times: CPU s for
the baselines, wall s for ``denoise`` (one torch thread, incl. lattice measurement); the wall time on
a 512² image is printed at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from aiida_automat.denoise import denoise, load_model  # noqa: E402
from aiida_automat.denoise.data import column_truth_px  # noqa: E402
from aiida_automat.errors import AutomatError  # noqa: E402
from aiida_automat.imaging.fastsim import fast_image  # noqa: E402
from aiida_automat.imaging.microscope import Microscope  # noqa: E402
from aiida_automat.reconstruct.columns import find_columns  # noqa: E402

DOSES = (2e3, 1e4, 6e4)
MODES = ("idpc", "adf")
PX = 0.1
SHAPE = (256, 256)


# held-out specimens (``denoise.data.held_out_structures``: never simulated for training or gate fitting):
# light (h-BP, BeO2), medium (TiS2, SnSe2) and heavy (ReSe2, HgI2) columns; no entry of the same formula
# is in the training pool either
HELD_OUT = ("B2P2", "BeO2", "S2Ti", "Se2Sn", "ReSe2", "HgI2")


def structures():
    from aiida_automat.denoise.data import held_out_structures, training_structures

    seen = {a.get_chemical_formula() for a in training_structures()}
    pool = {}
    for a in held_out_structures():
        pool.setdefault(a.get_chemical_formula(), a)
    missing = [f for f in HELD_OUT if f not in pool]
    if missing:
        raise SystemExit(f"held-out specimens not in the held-out pool: {missing}")
    also = [f for f in HELD_OUT if f in seen]
    if also:
        raise SystemExit(f"another entry of {also} is in the training pool: not a held-out specimen")
    return {f: pool[f] for f in HELD_OUT}


GAUSS_SIGMAS_PX = (1.0, 1.5, 2.0, 3.0)


def baselines(noisy):
    """Classical baselines and their CPU seconds; Gaussian at several σ (the best per row is reported)."""
    from skimage.restoration import denoise_nl_means, estimate_sigma

    import bm3d

    d = np.asarray(noisy, dtype=np.float64)
    out, times = {"raw": d}, {"raw": 0.0}
    for s in GAUSS_SIGMAS_PX:
        t0 = time.process_time()
        out[f"gauss{s:g}"] = ndimage.gaussian_filter(d, s)
        times[f"gauss{s:g}"] = time.process_time() - t0
    t0 = time.process_time()
    sig = float(estimate_sigma(d))
    out["nlm"] = denoise_nl_means(d, h=0.8 * sig, sigma=sig, patch_size=5, patch_distance=6, fast_mode=True)
    times["nlm"] = time.process_time() - t0
    t0 = time.process_time()
    lo, hi = float(d.min()), float(d.max())
    s = (hi - lo) or 1.0
    out["bm3d"] = bm3d.bm3d((d - lo) / s, sigma_psd=sig / s) * s + lo
    times["bm3d"] = time.process_time() - t0
    return out, times


def psnr(x, ref):
    mse = float(np.mean((x - ref) ** 2))
    return 10 * math.log10(float(np.ptp(ref)) ** 2 / max(mse, 1e-30))


def ssim(x, ref):
    from skimage.metrics import structural_similarity

    return float(structural_similarity(x, ref, data_range=float(np.ptp(ref))))


def column_rmse(img, truth_px):
    try:
        cols = find_columns(img)
    except AutomatError:
        return float("nan"), 0.0
    good = cols.good
    if good.sum() == 0:
        return float("nan"), 0.0
    d, _ = cKDTree(truth_px).query(cols.positions_px[good])
    ok = d * PX < 0.6
    inner = (truth_px[:, 0] > 12) & (truth_px[:, 1] > 12) & (truth_px[:, 0] < SHAPE[0] - 12) & (truth_px[:, 1] < SHAPE[1] - 12)
    dd, _ = cKDTree(cols.positions_px[good]).query(truth_px[inner])
    recall = float(np.mean(dd * PX < 0.6)) if inner.any() else 0.0
    return (float(np.sqrt(np.mean(d[ok] ** 2)) * PX) if ok.any() else float("nan")), recall


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6, help="images per (mode, dose); specimens cycle through HELD_OUT")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    model = load_model(args.checkpoint) if args.checkpoint else None
    rng = np.random.default_rng(args.seed)
    structs = structures()
    names = list(structs)
    methods = ("raw",) + tuple(f"gauss{s:g}" for s in GAUSS_SIGMAS_PX) + ("nlm", "bm3d", "moe", "moe-strong")
    print(f"checkpoint: {args.checkpoint or 'bundled'}; {args.n} images per row; seed {args.seed}\n")
    print("| mode | dose e/Å² | method | PSNR dB | SSIM | column RMSE Å | recall | CPU/wall s per image |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for mode in MODES:
        mic = Microscope(mode=mode, voltage_kV=80.0, semiangle_mrad=30.0, source_size_A=0.3)
        for dose in DOSES:
            acc = {m: [] for m in methods}
            for i in range(args.n):
                name = names[i % len(names)]
                rot = float(rng.uniform(0, 360))
                off = (float(rng.uniform(0, 3)), float(rng.uniform(0, 3)))
                seed = int(rng.integers(2**31))
                clean = fast_image(structs[name], mic, PX, SHAPE, rot, off)
                noisy = fast_image(structs[name], mic, PX, SHAPE, rot, off, dose_e_per_A2=dose,
                                   rng=np.random.default_rng(seed))
                truth = column_truth_px(structs[name], SHAPE, PX, rot, off)
                ref = clean.data.astype(np.float64)
                outs, times = baselines(noisy.data)
                t0 = time.perf_counter()
                res = denoise(noisy, model=model)
                times["moe"] = time.perf_counter() - t0
                outs["moe"] = res.image.data.astype(np.float64)
                t0 = time.perf_counter()
                outs["moe-strong"] = denoise(noisy, model=model, setting="strong").image.data.astype(np.float64)
                times["moe-strong"] = time.perf_counter() - t0
                for m in methods:
                    r, rec = column_rmse(noisy.replace(data=outs[m]), truth)
                    acc[m].append((psnr(outs[m], ref), ssim(outs[m], ref), r, rec, times[m]))
            rows = {}
            for m in methods:
                a = np.array(acc[m], dtype=float)
                nfail = int(np.sum(np.isnan(a[:, 2])))
                rows[m] = (np.nanmean(a, axis=0), nfail)
            # the Gaussian with the lowest column RMSE in this row stands for "Gaussian" (oracle σ)
            best = min((m for m in methods if m.startswith("gauss")), key=lambda m: rows[m][0][2])
            for m in ("raw", best, "nlm", "bm3d", "moe", "moe-strong"):
                mean, nfail = rows[m]
                label = f"gauss σ={best[5:]} px (best)" if m == best else m
                rm = f"{mean[2]:.4f}" + (f" ({nfail} failed)" if nfail else "")
                print(f"| {mode} | {dose:.0e} | {label} | {mean[0]:.2f} | {mean[1]:.3f} | {rm} | {mean[3]:.2f} | {mean[4]:.2f} |")
                summary[(mode, dose, "gauss" if m == best else m)] = mean
            sys.stdout.flush()
    # speed on 512²
    mic = Microscope(mode="adf", voltage_kV=80.0, semiangle_mrad=30.0, source_size_A=0.3)
    from ase.build import mx2

    mos2 = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19)
    big = fast_image(mos2, mic, PX, (512, 512), 7.0, dose_e_per_A2=1e4, rng=np.random.default_rng(1))
    denoise(big, model=model)
    t0 = time.perf_counter()
    res = denoise(big, model=model)
    wall = time.perf_counter() - t0
    print(f"\ndenoise 512² (ADF, 1e4): {wall:.2f} s wall on 1 torch thread (incl. lattice measurement); "
          f"gate weights {dict((k, round(v, 3)) for k, v in res.gate_weights.items())}")
    return summary


if __name__ == "__main__":
    main()
