"""Training and benchmark data for the denoiser, made with our own fast simulator.

Every image is a pair (noisy, clean) of the same specimen and scan, rendered with
``imaging.fastsim`` at a random pixel size (0.05–0.2 Å) and then resampled to the model sampling (0.1 Å/px)
exactly the way ``denoise`` resamples real images, so the network sees the resampling it will meet.
Randomised per image: structure (2D materials from the bundled subsets + MoS2), mode (iDPC or ADF),
voltage, convergence angle, defocus (±40 Å), source size (0–0.6 Å), rotation, offset, dose
(10³–10⁵ e⁻/Å², log-uniform) and scan line jitter (0–0.4 px).

Every tenth structure of the pool is held out (``held_out_structures``): neither the network nor the gate
ever sees it, so the benchmark can measure the denoiser on specimens it was not trained on.
"""

from __future__ import annotations

import functools
import math
import pathlib
from dataclasses import dataclass

import numpy as np

from ..imaging.microscope import Microscope
from ..imaging.noise import ScanDistortion

__all__ = ["Pair", "column_truth_px", "held_out_structures", "make_pair", "sample_case", "training_structures"]

MODEL_PIXEL_A = 0.1
TRAIN_MODES = ("idpc", "adf")
_RES = pathlib.Path(__file__).resolve().parents[1] / "resources" / "structures"
HELD_OUT_EVERY = 10  # entry i of the pool (i ≥ 1) is held out of training when i % 10 == 5
HELD_OUT_RULE = "pool entries i >= 1 with i % 10 == 5 are held out (never simulated for training or gate fitting)"


def _is_held_out(i: int) -> bool:
    return i >= 1 and i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2


def training_structures() -> tuple:
    """The training pool without the held-out tenth (MoS2, entry 0, always trains)."""
    return tuple(a for i, a in enumerate(_pool()) if not _is_held_out(i))


def held_out_structures() -> tuple:
    """The tenth of the pool the denoiser never sees: the benchmark's specimens."""
    return tuple(a for i, a in enumerate(_pool()) if _is_held_out(i))


@functools.lru_cache(maxsize=1)
def _pool(max_atoms: int = 9, max_a_A: float = 6.5) -> tuple:
    """Small-cell 2D structures from the bundled subsets (deterministic order), MoS2 first."""
    from ase.build import mx2

    from ..imaging.structures import read_structures, validate_layer

    out = [mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19)]
    for name in ("mc2d_mounet2018.extxyz", "2dmatpedia_subset.extxyz"):
        path = _RES / name
        if not path.exists():
            continue
        for at in read_structures(path):
            try:
                validate_layer(at)
            except Exception:  # noqa: BLE001 - skip unusable entries
                continue
            cell = np.asarray(at.cell[:2, :2])
            lens = np.linalg.norm(cell, axis=1)
            if len(at) <= max_atoms and lens.max() <= max_a_A and lens.min() >= 2.3:
                out.append(at)
    return tuple(out)


@dataclass(frozen=True)
class Pair:
    noisy: np.ndarray  # at the model sampling, image units
    clean: np.ndarray
    mode: str
    dose: float
    pixel_size_A: float  # the simulated (acquired) pixel size
    case: dict


def sample_case(rng: np.random.Generator, n_structures: int, *, mode=None, dose=None, pixel_size_A=None,
                jitter=True) -> dict:
    mode = mode or TRAIN_MODES[int(rng.integers(len(TRAIN_MODES)))]
    return {
        "structure": int(rng.integers(n_structures)),
        "mode": mode,
        "voltage_kV": float(rng.choice([60.0, 80.0, 200.0, 300.0])),
        "semiangle_mrad": float(rng.uniform(20.0, 32.0)),
        "defocus_A": float(rng.normal(0.0, 20.0)),
        "source_size_A": float(rng.uniform(0.0, 0.6)),
        "rotation_deg": float(rng.uniform(0.0, 360.0)),
        "offset_A": (float(rng.uniform(0, 5)), float(rng.uniform(0, 5))),
        "dose": float(dose if dose is not None else 10 ** rng.uniform(3.0, 5.0)),
        "pixel_size_A": float(pixel_size_A if pixel_size_A is not None else rng.uniform(0.05, 0.2)),
        "jitter_px": float(rng.uniform(0.0, 0.4)) if jitter else 0.0,
    }


def microscope_for(case: dict) -> Microscope:
    return Microscope(mode=case["mode"], voltage_kV=case["voltage_kV"], semiangle_mrad=case["semiangle_mrad"],
                      defocus_A=case["defocus_A"], source_size_A=case["source_size_A"])


def make_pair(case: dict, rng: np.random.Generator, *, shape=(128, 128), resample=True, structures=None,
              undistorted_clean: bool = False) -> Pair:
    """Render (noisy, clean) for ``case``; ``shape`` is at the model sampling when ``resample``.

    ``undistorted_clean`` renders the clean image without the scan jitter: the specimen as it is, the
    target for choosing experts by where they put the columns (a Bragg average removes jitter, which a
    jittered target would count against it).
    """
    from ..imaging.fastsim import cell_fourier_coefficients, render
    from .core import resample_to

    structures = structures or training_structures()
    atoms = structures[case["structure"] % len(structures)]
    mic = microscope_for(case)
    p = case["pixel_size_A"]
    if resample:
        sim_shape = tuple(int(math.ceil(s * MODEL_PIXEL_A / p)) for s in shape)
    else:
        sim_shape = tuple(shape)
    sim_shape = tuple(max(32, s) for s in sim_shape)
    coeffs = cell_fourier_coefficients(atoms, mic, rotation_deg=case["rotation_deg"])
    dist = ScanDistortion(line_jitter_px=case["jitter_px"]) if case["jitter_px"] > 0 else None
    seed = int(rng.integers(2**31))
    # the same jitter for both (same scan): two generators with one seed
    kw = dict(pixel_size_A=p, shape=sim_shape, rotation_deg=case["rotation_deg"], offset_A=case["offset_A"],
              distortion=dist)
    kw_clean = dict(kw, distortion=None) if undistorted_clean else kw
    clean = render(coeffs, mic, rng=np.random.default_rng(seed), **kw_clean).data.astype(np.float64)
    noisy = render(coeffs, mic, rng=np.random.default_rng(seed), dose_e_per_A2=case["dose"], **kw).data
    noisy = noisy.astype(np.float64)
    if resample:
        clean = resample_to(clean, shape)
        noisy = resample_to(noisy, shape)
    return Pair(noisy=noisy, clean=clean, mode=case["mode"], dose=case["dose"], pixel_size_A=p, case=dict(case))


def column_truth_px(atoms, shape, pixel_size_A, rotation_deg=0.0, offset_A=(0.0, 0.0), tol_A=0.05,
                    return_z=False):
    """True (row, col) positions of all projected columns in a fast-model image without scan distortion.

    fastsim places an atom at crystal-frame (x, y) = p at image point R(rotation)·p + offset, and pixel
    (i, j) samples (x, y) = (j·sx, i·sy). ``return_z`` also returns each column's summed atomic number.
    """
    sy, sx = (pixel_size_A, pixel_size_A) if np.isscalar(pixel_size_A) else pixel_size_A
    xy = np.asarray(atoms.positions[:, :2], dtype=float)
    uniq, zsum = [], []
    for p, z in zip(xy, atoms.numbers):
        for k, q in enumerate(uniq):
            if np.linalg.norm(p - q) < tol_A:
                zsum[k] += int(z)
                break
        else:
            uniq.append(p)
            zsum.append(int(z))
    uniq = np.array(uniq)
    cell = np.asarray(atoms.cell[:2, :2], dtype=float)
    a = math.radians(rotation_deg)
    R = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    fov = math.hypot(shape[0] * sy, shape[1] * sx) + 10.0
    n = int(math.ceil(fov / min(np.linalg.norm(cell, axis=1)) * 1.5)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    pts = (i.ravel()[:, None] * cell[0] + j.ravel()[:, None] * cell[1])[:, None, :] + uniq[None]
    pts = pts.reshape(-1, 2) @ R.T + np.asarray(offset_A, dtype=float)
    rc = np.stack([pts[:, 1] / sy, pts[:, 0] / sx], axis=1)
    keep = (rc[:, 0] > -5) & (rc[:, 1] > -5) & (rc[:, 0] < shape[0] + 5) & (rc[:, 1] < shape[1] + 5)
    if return_z:
        return rc[keep], np.tile(np.array(zsum), len(i.ravel()))[keep]
    return rc[keep]
