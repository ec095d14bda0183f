"""The image's average unit cell, as Fourier coefficients on the measured lattice.

Once the lattice is known, every pixel has a fractional coordinate ``u`` in that lattice, and projecting
the image onto the lattice harmonics ``exp(2πi (h,k)·u)`` averages all cells of the field at once. The
coefficients are translation-covariant (a shift multiplies them by a phase), independent of rotation and of
any affine scan distortion (fractional coordinates are affine-invariant), and far less noisy than any one
cell. Registration, refinement and verification all work on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..imaging.image import StemImage


@dataclass(frozen=True, eq=False)
class CellAverage:
    """``coeffs[i]`` belongs to integer index ``hk[i]`` (in the measured basis); ``sigma`` is the noise."""

    hk: np.ndarray
    coeffs: np.ndarray
    sigma: np.ndarray
    vectors_px: np.ndarray
    mean: float

    def synthesize(self, frac: np.ndarray, coeffs: np.ndarray | None = None) -> np.ndarray:
        """Evaluate the (real) series at fractional positions ``frac`` (..., 2)."""
        c = self.coeffs if coeffs is None else coeffs
        phase = np.exp(2j * np.pi * (frac @ self.hk.T.astype(float)))
        return np.real(phase @ c)

    def synthesize_grid(self, shape, coeffs: np.ndarray | None = None) -> np.ndarray:
        """``synthesize`` at every pixel of an image of ``shape``: the phase of a harmonic factorises into a row and
        a column term, so the field is one (rows × n) @ (n × cols) product instead of rows·cols·n exponentials (the
        verification re-synthesises the whole field for every candidate)."""
        c = self.coeffs if coeffs is None else coeffs
        rows, cols = _axis_phases(shape, self.vectors_px, self.hk)
        return np.real((rows * c[None, :]) @ cols.T)


def _axis_phases(shape, vectors_px: np.ndarray, hk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(2πi·row·a) and exp(2πi·col·b) per harmonic, with (h, k)·u = row·a + col·b (``fractional_grid``)."""
    ab = np.linalg.inv(np.asarray(vectors_px, dtype=float)) @ np.asarray(hk, dtype=float).T  # (2, n)
    rows = np.exp(2j * np.pi * np.arange(shape[0], dtype=float)[:, None] * ab[0][None, :])
    cols = np.exp(2j * np.pi * np.arange(shape[1], dtype=float)[:, None] * ab[1][None, :])
    return rows, cols


def fractional_grid(shape, vectors_px: np.ndarray) -> np.ndarray:
    """Fractional lattice coordinates (rows, cols, 2) of every pixel centre."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    r = np.stack([rows, cols], axis=-1)
    return r @ np.linalg.inv(np.asarray(vectors_px, dtype=float))


def index_set(vectors_px: np.ndarray, pixel_size_A, resolution_A: float, max_index: int = 12) -> np.ndarray:
    """All (h, k) ≠ (0, 0) whose spacing is above ``resolution_A`` (one of each ±pair)."""
    vec_A = np.asarray(vectors_px, dtype=float) * np.asarray(pixel_size_A, dtype=float)[None, :]
    recip = np.linalg.inv(vec_A).T
    h = np.arange(-max_index, max_index + 1)
    H, K = np.meshgrid(h, h, indexing="ij")
    hk = np.stack([H.ravel(), K.ravel()], axis=1)
    g = np.linalg.norm(hk @ recip, axis=1)
    keep = (g > 0) & (g <= 1.0 / resolution_A)
    hk = hk[keep]
    # one of each Friedel pair: first non-zero index positive
    first = np.where(hk[:, 0] != 0, hk[:, 0], hk[:, 1])
    return hk[first > 0]


def cell_average(image: StemImage, vectors_px: np.ndarray, resolution_A: float = 0.6) -> CellAverage:
    """Project the (Hann-windowed) image onto the lattice harmonics up to ``resolution_A``."""
    data = np.asarray(image.data, dtype=float)
    ny, nx = data.shape
    window = np.outer(np.hanning(ny), np.hanning(nx))
    wsum = float(window.sum())
    mean = float((data * window).sum() / wsum)
    hk = index_set(vectors_px, image.pixel_size_A, resolution_A)
    weighted = (data - mean) * window
    # the projection factorises over rows and columns (``_axis_phases``): Σ_rows conj(R) · (W @ conj(C))
    rows, cols = _axis_phases(data.shape, vectors_px, hk)
    coeffs = np.sum(np.conj(rows) * (weighted @ np.conj(cols)), axis=0) / wsum
    # noise per coefficient from the residual after removing the periodic part (white-noise estimate)
    resid_var = float(np.var(data - mean)) - 2.0 * float(np.sum(np.abs(coeffs) ** 2))
    resid_var = max(resid_var, 1e-12 * float(np.var(data)) + 1e-30)
    n_eff = wsum**2 / float((window**2).sum())
    sigma = np.full(len(hk), np.sqrt(resid_var / n_eff))
    return CellAverage(hk=hk, coeffs=coeffs, sigma=sigma, vectors_px=np.asarray(vectors_px, float), mean=mean)
