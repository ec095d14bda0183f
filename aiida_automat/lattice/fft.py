"""Fourier-space tools for lattice measurement.

Why a zoomed discrete-time Fourier transform instead of a padded FFT: the lattice constant has to be
known to ~0.1 % while a first-order Bragg peak of a 256 px image sits only ~10 FFT bins from the origin,
so a bin is ~10 % of it. Evaluating the windowed image's transform at arbitrary (continuous) frequencies
around each peak costs one small matrix product per peak and has no interpolation bias, which
zero-padding or 3-point parabolas on the raw FFT grid do have.

Frequencies here are in cycles per pixel, ordered ``(row, col)`` like the image.
"""

from __future__ import annotations

import numpy as np


def _hann1d(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * (np.arange(n) + 0.5) / n)


def hann2d(shape: tuple[int, int]) -> np.ndarray:
    """Separable Hann window: suppresses the edge discontinuity of a non-integer number of cells."""
    ny, nx = shape
    return np.outer(_hann1d(ny), _hann1d(nx))


def windowed(data: np.ndarray) -> np.ndarray:
    """Window the image after removing its weighted mean, so the DC term does not leak into low orders."""
    data = np.asarray(data, dtype=np.float64)
    win = hann2d(data.shape)
    mean = float(np.sum(data * win) / np.sum(win))
    return (data - mean) * win


def frequency_grids(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = shape
    kr = np.fft.fftfreq(ny)[:, None] * np.ones((1, nx))
    kc = np.fft.fftfreq(nx)[None, :] * np.ones((ny, 1))
    return kr, kc


def radial_background(power: np.ndarray, ring_bins: float = 2.0, quantile: float = 0.25) -> np.ndarray:
    """Mean noise power as a function of |k|, from a low quantile of each ring.

    For a noise-dominated ring the power is exponentially distributed, so its q-quantile is
    ``-mean·ln(1-q)`` and ``power / background`` is ~Exp(1) wherever there is no signal, whatever the
    low-frequency fall-off of the spectrum. A low quantile (not the median) is used because at small |k|
    a ring has few pixels and the Bragg peaks' main lobes can fill half of it.
    """
    ny, nx = power.shape
    n = max(ny, nx)
    kr, kc = frequency_grids(power.shape)
    rad = np.hypot(kr * n, kc * n)
    labels = np.floor(rad / ring_bins).astype(np.int64).ravel()
    flat = power.ravel()
    order = np.lexsort((flat, labels))
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = starts + np.floor(quantile * np.maximum(counts - 1, 0)).astype(np.int64)
    level = np.where(counts > 0, flat[order][np.minimum(pick, flat.size - 1)], np.nan)
    level = np.where(np.isfinite(level) & (level > 0), level, np.nan)
    if np.any(np.isnan(level)):
        good = np.flatnonzero(~np.isnan(level))
        level = np.interp(np.arange(len(level)), good, level[good]) if len(good) else np.ones(len(level))
    return (level[labels] / -np.log1p(-quantile)).reshape(power.shape)


def dtft(fw: np.ndarray, kr: np.ndarray, kc: np.ndarray) -> np.ndarray:
    """Transform of ``fw`` on the outer grid ``kr × kc`` (cycles/px), same sign convention as fft2."""
    ny, nx = fw.shape
    er = np.exp(-2j * np.pi * np.outer(np.asarray(kr, dtype=float), np.arange(ny)))
    ec = np.exp(-2j * np.pi * np.outer(np.asarray(kc, dtype=float), np.arange(nx)))
    return er @ fw @ ec.T


def _quadratic_peak(values: np.ndarray) -> tuple[float, float]:
    """Vertex of a 2D quadratic through a 3×3 patch (offsets in grid steps), clipped to the patch."""
    z = values
    dy = 0.5 * (z[2, 1] - z[0, 1])
    dx = 0.5 * (z[1, 2] - z[1, 0])
    dyy = z[2, 1] - 2 * z[1, 1] + z[0, 1]
    dxx = z[1, 2] - 2 * z[1, 1] + z[1, 0]
    dxy = 0.25 * (z[2, 2] - z[2, 0] - z[0, 2] + z[0, 0])
    hess = np.array([[dyy, dxy], [dxy, dxx]])
    try:
        step = -np.linalg.solve(hess, np.array([dy, dx]))
    except np.linalg.LinAlgError:
        return 0.0, 0.0
    if not np.all(np.isfinite(step)) or np.linalg.det(hess) <= 0 or dyy >= 0:
        return 0.0, 0.0
    return float(np.clip(step[0], -1.0, 1.0)), float(np.clip(step[1], -1.0, 1.0))


def window_transform(shape: tuple[int, int], dkr: np.ndarray, dkc: np.ndarray) -> np.ndarray:
    """Transform of the Hann window (``hann2d``) on the outer grid ``dkr × dkc`` (cycles/px).

    A periodic component ``c·exp(2πi G·x)`` of the image appears in ``dtft(windowed(image))`` as
    ``c·window_transform(k − G)``: the exact shape of a Bragg peak, tails included.
    """
    ny, nx = shape
    ey = np.exp(-2j * np.pi * np.outer(np.asarray(dkr, dtype=float), np.arange(ny))) @ _hann1d(ny)
    ex = np.exp(-2j * np.pi * np.outer(np.asarray(dkc, dtype=float), np.arange(nx))) @ _hann1d(nx)
    return np.outer(ey, ex)


def peaks_model(shape, kr: np.ndarray, kc: np.ndarray, peaks) -> np.ndarray:
    """Sum of Bragg peaks ``(k_r, k_c, amplitude)`` and their Hermitian partners on the grid ``kr × kc``."""
    out = np.zeros((len(kr), len(kc)), dtype=complex)
    for pr, pc, amp in peaks:
        out += amp * window_transform(shape, kr - pr, kc - pc)
        out += np.conj(amp) * window_transform(shape, kr + pr, kc + pc)
    return out


def refine_peak(fw: np.ndarray, k0: tuple[float, float], *, steps_bins=(0.3, 0.06, 0.015), others=()) -> tuple[float, float, float]:
    """Sub-bin position of a Bragg peak by successive zooms of the DTFT around ``k0``.

    Returns ``(kr, kc, power)``. Each zoom evaluates a 5×5 grid, moves to its maximum and fits a quadratic
    to log-power on the 3×3 around it; the Hann main lobe is smooth and ~4 bins wide, so the last
    quadratic is essentially exact. Neighbouring peaks leak in through their tails (∝ 1/δ³ beyond the main
    lobe, but a cell with a long axis puts neighbours 2–3 bins apart, inside it, and a weak superstructure
    reflection can sit on the tail of a 10³× stronger one); ``others`` — ``(k_r, k_c, amplitude)`` of
    those neighbours — are subtracted (``peaks_model``) before the search.
    """
    ny, nx = fw.shape
    kr0, kc0 = float(k0[0]), float(k0[1])
    power = 0.0

    def spectrum(kr, kc):
        d = dtft(fw, kr, kc)
        return d - peaks_model(fw.shape, kr, kc, others) if len(others) else d

    for step in steps_bins:
        offs = np.arange(-2, 3) * step
        for _ in range(3):
            p = np.abs(spectrum(kr0 + offs / ny, kc0 + offs / nx)) ** 2
            i, j = np.unravel_index(int(np.argmax(p)), p.shape)
            if 1 <= i <= 3 and 1 <= j <= 3:
                break
            kr0 += offs[i] / ny
            kc0 += offs[j] / nx
        i, j = min(max(i, 1), 3), min(max(j, 1), 3)
        patch = np.log(np.maximum(p[i - 1:i + 2, j - 1:j + 2], 1e-300))
        di, dj = _quadratic_peak(patch)
        kr0 += (offs[i] + di * step) / ny
        kc0 += (offs[j] + dj * step) / nx
        power = float(np.max(p))
    final = np.abs(spectrum(np.array([kr0]), np.array([kc0]))[0, 0]) ** 2
    return kr0, kc0, float(max(final, power))


def peak_amplitude(fw: np.ndarray, k: tuple[float, float], others=()) -> complex:
    """Complex amplitude ``c`` of the periodic component at ``k`` (after subtracting ``others``)."""
    kr, kc = np.array([float(k[0])]), np.array([float(k[1])])
    d = dtft(fw, kr, kc)[0, 0]
    if len(others):
        d -= peaks_model(fw.shape, kr, kc, others)[0, 0]
    return complex(d / window_transform(fw.shape, np.zeros(1), np.zeros(1))[0, 0])


def refine_peaks(fw: np.ndarray, k0s, *, passes: int = 2, reach_bins: float = 6.0) -> np.ndarray:
    """Refine several Bragg peaks jointly: each on the spectrum minus the current model of its neighbours.

    ``k0s`` (cycles/px, rows ``(k_r, k_c)``) should come strongest first: in the first pass each peak sees
    only the stronger ones (already refined), in later passes all others. Returns refined ``(k_r, k_c)``.
    """
    ny, nx = fw.shape
    k = np.array(k0s, dtype=float).reshape(-1, 2)
    amp = np.zeros(len(k), dtype=complex)
    done = np.zeros(len(k), bool)
    scale = np.array([ny, nx], dtype=float)
    for _pass in range(max(1, passes)):
        for i in range(len(k)):
            d = np.abs(k[:, None, :] * scale - np.stack([k[i], -k[i]])[None, :, :] * scale).max(axis=2).min(axis=1)
            near = np.flatnonzero(done & (d <= reach_bins))
            near = near[near != i]
            if _pass > 0 and len(near) == 0:
                continue  # nothing to subtract: the first pass's answer stands
            others = [(k[j, 0], k[j, 1], amp[j]) for j in near]
            kr, kc, _ = refine_peak(fw, k[i], others=others)
            k[i] = (kr, kc)
            amp[i] = peak_amplitude(fw, k[i], others)
            done[i] = True
    return k
