"""Closed-loop verification: does the reconstructed structure, imaged again, look like the image?

The reconstructed columns are re-imaged with the fast physical model (fixed physical contrast per column,
only a global scale and the instrument blur free) at the measured lattice and orientation, and compared
with the observed average cell (weighted normalised cross-correlation over the lattice harmonics) and with
the whole field in real space (which also sees defects). The coefficient NCC ranks candidates and is the
reported confidence; the real-space residual map shows where the model fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..imaging.image import StemImage
from .cellavg import CellAverage
from .registration import Registration

#: ranking penalty per unit of isotropic strain beyond STRAIN_FREE that a template needs to fit the image:
#: monolayers are rarely strained by more than a per cent, so between look-alikes (h-AlN and 2H-MoS2 image
#: alike in HAADF) the one that fits without strain is the better explanation
STRAIN_WEIGHT, STRAIN_FREE = 0.5, 0.005


@dataclass(frozen=True, eq=False)
class Verification:
    score: float  # weighted NCC of physical model vs observed lattice harmonics (1 = perfect)
    real_space_ncc: float  # NCC of the periodic model with the whole field
    residual_rms: float  # RMS of the real-space residual relative to the image's periodic signal
    residual_map: np.ndarray  # image − scaled model (same shape as the image)
    model_image: np.ndarray
    contrast: float = float("nan")  # least-squares image/model scale of the lattice harmonics (model in beam fractions)


def model_coefficients(reg: Registration, cell: CellAverage, blur_A: float | None = None) -> np.ndarray:
    hk = cell.hk.astype(float)
    phases = np.exp(-2j * np.pi * (reg.frac @ hk.T))
    model = np.sum(reg.column_coeffs * phases, axis=0)
    if blur_A:
        # blur in Å needs |g| in 1/Å: the registration's motif cell gives the metric (scale-free enough)
        V_A_inv = np.linalg.inv(reg.motif.cell_xy * reg.scale)
        g2 = np.sum((hk @ V_A_inv.T) ** 2, axis=1)
        model = model * np.exp(-2 * np.pi**2 * blur_A**2 * g2)
    return model


def _weighted_products(cell: CellAverage, model: np.ndarray) -> tuple[float, float, float]:
    """⟨data, model⟩, ⟨model, model⟩ and ⟨data, data⟩ over the lattice harmonics, weighted by 1/σ²."""
    w = 1.0 / np.maximum(cell.sigma, 1e-30) ** 2
    return (float(np.real(np.sum(w * cell.coeffs * np.conj(model)))), float(np.sum(w * np.abs(model) ** 2)),
            float(np.sum(w * np.abs(cell.coeffs) ** 2)))


def _ncc(cell: CellAverage, model: np.ndarray) -> float:
    dm, mm, dd = _weighted_products(cell, model)
    return dm / (float(np.sqrt(dd * mm)) + 1e-30)


def _contrast(cell: CellAverage, model: np.ndarray) -> float:
    dm, mm, _ = _weighted_products(cell, model)
    return dm / max(mm, 1e-300)


def best_blur(reg: Registration, cell: CellAverage, max_blur_A: float = 1.5) -> float:
    """The instrument blur (Gaussian σ, Å) that best matches: one nuisance parameter, the same for every
    candidate, so that a sharper or softer probe than the metadata says does not decide between them."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda b: -_ncc(cell, model_coefficients(reg, cell, b)), bounds=(0.0, max_blur_A),
                          method="bounded", options={"xatol": 1e-3})
    return float(res.x)


def verify(image: StemImage, cell: CellAverage, reg: Registration, *, fit_blur: bool = False) -> Verification:
    blur = best_blur(reg, cell) if fit_blur else reg.blur_A
    model = model_coefficients(reg, cell, blur)
    score = _ncc(cell, model)
    model_img = 2.0 * cell.synthesize_grid(image.shape, model)
    data = np.asarray(image.data, dtype=float) - cell.mean
    scale = float(np.sum(data * model_img) / max(np.sum(model_img**2), 1e-30))
    resid = data - scale * model_img
    periodic = 2.0 * cell.synthesize_grid(image.shape)
    rs_ncc = float(np.corrcoef(data.ravel(), model_img.ravel())[0, 1]) if np.std(model_img) > 0 else 0.0
    rel = float(np.sqrt(np.mean(resid**2)) / max(np.sqrt(np.mean(periodic**2)), 1e-30))
    return Verification(score, rs_ncc, rel, resid.astype(np.float32), (scale * model_img + cell.mean).astype(np.float32),
                        _contrast(cell, model))
