"""Mixture-of-experts denoising of a STEM image.

Steps (all deterministic, no per-patch statistics):

1. ``image.validate()`` (NaN/inf, blank, < 32 px → ``ImageError``).
2. Global normalisation ``(x − median) / scale`` with ``scale`` = 1st–99th percentile range of the whole
   image; undone at the end, so relative column intensities survive (an affine map of the whole image).
3. Resample to the model sampling (0.1 Å/px, per axis, cubic with anti-aliasing) and back at the end.
4. Experts, each a full image at the model sampling:
   * ``cnn``: a small residual CNN conditioned on the noise σ and the mode, run on overlapping tiles
     blended with raised-cosine weights (any image size), then low-passed at the probe's band limit
     2α/λ (from ``image.microscope``: nothing above it is signal);
   * ``bragg``: Fourier filter keeping soft Gaussian spots at every reciprocal-lattice point of the
     lattice measured by ``measure_lattice``; with ``keep_aperiodic`` the non-periodic residual
     (vacancies, edges, dopants) is added back after a mild Gaussian filter;
   * ``gauss``: a Gaussian filter whose width follows the noise level (fallback; always available).
5. Gate: softmax of a linear function of (1, log10 σ, periodicity, iDPC flag), weights learnt on simulated
   data (``train.fit_gate``); experts that are unavailable (no lattice) are masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np
from scipy import ndimage
from scipy.fft import next_fast_len

from ..errors import ImageError, LatticeNotFound
from ..imaging.image import StemImage
from .model import EXPERTS, GATE_FEATURES, DenoiserModel, default_model

__all__ = ["DenoiseResult", "denoise", "noise_sigma", "resample_to", "robust_normalisation", "SETTINGS"]

SETTINGS = ("auto", "light", "strong", "none")
TILE = 1024
OVERLAP = 64
LATTICE_CROP = 256  # px at the model sampling (25.6 Å): enough cells, and 512² costs no more than 256²


@dataclass(frozen=True, eq=False)
class DenoiseResult:
    """Denoised image (same shape, calibration and units as the input) and how it was made.

    ``gate_weights`` maps expert name → weight (sum 1); ``noise_sigma`` is the estimated pixel noise of
    the input in image units; ``features`` are the gate inputs; ``periodicity`` comes from the lattice.
    """

    image: StemImage
    gate_weights: Mapping[str, float]
    noise_sigma: float
    setting: str
    features: Mapping[str, float] = field(default_factory=dict)
    lattice: object = None
    model_sha256: str | None = None
    experts: Mapping[str, np.ndarray] | None = None


# ------------------------------------------------------------------------------------------------ utils


def robust_normalisation(data: np.ndarray) -> tuple[float, float]:
    """(offset, scale) of the whole image: median and 1st–99th percentile range."""
    lo, med, hi = np.percentile(data, [1.0, 50.0, 99.0])
    scale = float(hi - lo)
    if not scale > 0:
        scale = float(np.ptp(data)) or 1.0
    return float(med), scale


def noise_sigma(data: np.ndarray) -> float:
    """Pixel noise σ (same units as data): Immerkær's Laplacian-difference estimator.

    It uses the *mean* absolute response of a kernel that cancels planes and quadratics, so it does not
    collapse to 0 on low-count Poisson images (where most neighbour differences are exactly 0 and any
    median-based estimate reads 0); band-limited signal inflates it only slightly.
    """
    d = np.asarray(data, dtype=np.float64)
    if min(d.shape) < 3:
        return 0.0
    k = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
    r = ndimage.convolve(d, k, mode="reflect")[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2.0) * np.mean(np.abs(r)) / 6.0)


def resample_to(data: np.ndarray, shape) -> np.ndarray:
    """Cubic resampling to ``shape`` (anti-aliased when shrinking); identity when the shape is equal."""
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape) == shape:
        return np.asarray(data, dtype=np.float64)
    from skimage.transform import resize

    shrink = any(s < d for s, d in zip(shape, data.shape))
    return resize(np.asarray(data, dtype=np.float64), shape, order=3, mode="reflect",
                  anti_aliasing=shrink, preserve_range=True)


def _model_shape(shape, pixel_size_A, model_px: float):
    return tuple(max(16, int(round(n * p / model_px))) for n, p in zip(shape, pixel_size_A))


def _blend_window(n: int, overlap: int) -> np.ndarray:
    w = np.ones(n)
    if overlap > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        w[:overlap] = ramp
        w[-overlap:] = ramp[::-1]
    return w


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


def run_cnn(net, x: np.ndarray, sigma: float, idpc: bool, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """CNN on overlapping tiles (reflect-padded to even size), blended with raised-cosine weights."""
    import torch

    ny, nx = x.shape
    pad = 8
    xp = np.pad(x, ((pad, pad + (ny % 2)), (pad, pad + (nx % 2))), mode="reflect")
    Ny, Nx = xp.shape
    ty, tx = min(tile, Ny), min(tile, Nx)
    ty -= ty % 2
    tx -= tx % 2
    out = np.zeros_like(xp)
    wsum = np.zeros_like(xp)
    rs, cs = _tile_starts(Ny, ty, overlap), _tile_starts(Nx, tx, overlap)
    wy = _blend_window(ty, overlap if len(rs) > 1 else 0)
    wx = _blend_window(tx, overlap if len(cs) > 1 else 0)
    w2 = np.outer(wy, wx)
    s = torch.tensor([sigma], dtype=torch.float32)
    f = torch.tensor([1.0 if idpc else 0.0], dtype=torch.float32)
    with torch.inference_mode():
        for r in rs:
            for c in cs:
                patch = torch.from_numpy(np.ascontiguousarray(xp[r:r + ty, c:c + tx], dtype=np.float32))[None, None]
                y = net(patch, s, f)[0, 0].numpy().astype(np.float64)
                out[r:r + ty, c:c + tx] += y * w2
                wsum[r:r + ty, c:c + tx] += w2
    out /= np.maximum(wsum, 1e-12)
    return out[pad:pad + ny, pad:pad + nx]


def bragg_filter(x: np.ndarray, reciprocal_px: np.ndarray, *, window_px: float = 60.0,
                 keep_aperiodic: bool = True, residual_sigma_px: float = 2.0, residual_k: float = 3.0) -> np.ndarray:
    """Average every pixel with its lattice translates inside a Gaussian window of σ = ``window_px``.

    In Fourier space this keeps Gaussian spots at all reciprocal-lattice points of ``reciprocal_px``
    (cycles/px). It is done as a *normalised* convolution: the image (times a soft in-field weight) and
    the weight itself are filtered on a zero-padded grid and divided, so a pixel near the edge is the
    mean of the translates that exist in the field. Mirror padding, the obvious alternative, adds a
    mirrored crystal whose columns do not lie on the lattice and pulls every column within one window of
    the edge (0.03–0.04 Å even on a noise-free image).

    With ``keep_aperiodic`` the non-periodic remainder (image − periodic part) is Gaussian-filtered and
    soft-thresholded at ``residual_k`` × its robust spread, then added back: a vacancy or dopant (a
    deviation of a whole column) survives, the noise (small deviations everywhere) does not.
    """
    ny, nx = x.shape
    pad = int(math.ceil(3.0 * window_px))
    Ny, Nx = next_fast_len(ny + pad, real=True), next_fast_len(nx + pad, real=True)
    taper = np.outer(_blend_window(ny, min(4, ny // 4)), _blend_window(nx, min(4, nx // 4)))
    num = np.zeros((Ny, Nx))
    den = np.zeros((Ny, Nx))
    num[:ny, :nx] = x * taper
    den[:ny, :nx] = taper
    kr = np.fft.fftfreq(Ny)[:, None]
    kc = np.fft.rfftfreq(Nx)[None, :]
    g = np.asarray(reciprocal_px, dtype=float)  # rows g1, g2 (cycles/px, (row, col))
    a = np.linalg.inv(g).T  # real-space vectors (px), a_i · g_j = δ_ij
    h = kr * a[0, 0] + kc * a[0, 1]
    k = kr * a[1, 0] + kc * a[1, 1]
    dh, dk = h - np.rint(h), k - np.rint(k)
    dr = dh * g[0, 0] + dk * g[1, 0]
    dc = dh * g[0, 1] + dk * g[1, 1]
    sig_k = 1.0 / (2.0 * math.pi * window_px)
    mask = np.exp(-0.5 * (dr**2 + dc**2) / sig_k**2)
    fn = np.fft.irfft2(np.fft.rfft2(num) * mask, s=num.shape)[:ny, :nx]
    fd = np.fft.irfft2(np.fft.rfft2(den) * mask, s=den.shape)[:ny, :nx]
    # the denominator is the (periodic, positive) count of translates; guard the rare sinc undershoot
    out = fn / np.maximum(fd, 0.05 * float(np.max(fd)))
    if keep_aperiodic:
        r = ndimage.gaussian_filter(x - out, residual_sigma_px, mode="reflect")
        spread = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        t = residual_k * spread
        out = out + np.sign(r) * np.maximum(np.abs(r) - t, 0.0)
    return out


def band_limit(x: np.ndarray, kmax_px: float | None, width: float = 0.15) -> np.ndarray:
    """Remove spatial frequencies above the probe's band limit ``kmax_px`` (cycles/px), cosine edge ±width.

    A STEM image holds no information above 2α/λ (the probe's aperture autocorrelation), so anything
    there is noise or artefact (e.g. the CNN's sub-pixel checkerboard); mirror-padded to avoid edge leaks.
    """
    if kmax_px is None or kmax_px >= 0.5 * math.sqrt(2.0):
        return x
    ny, nx = x.shape
    xp = np.pad(x, ((ny // 2, ny - ny // 2), (nx // 2, nx - nx // 2)), mode="symmetric")
    kr = np.fft.fftfreq(xp.shape[0])[:, None]
    kc = np.fft.rfftfreq(xp.shape[1])[None, :]
    k = np.hypot(kr, kc) / kmax_px
    m = np.clip((1.0 + width - k) / (2.0 * width), 0.0, 1.0)
    m = 0.5 - 0.5 * np.cos(np.pi * m)
    y = np.fft.irfft2(np.fft.rfft2(xp) * m, s=xp.shape)
    return y[ny // 2:ny // 2 + ny, nx // 2:nx // 2 + nx]


def probe_band_limit_px(microscope, model_px: float) -> float:
    """2α/λ of the microscope in cycles/px at the model sampling."""
    return 2.0 * microscope.semiangle_mrad * 1e-3 / microscope.wavelength_A * model_px


def gauss_expert(x: np.ndarray, sigma_norm: float) -> np.ndarray:
    """Gaussian filter, 0.8–2.5 px at 0.1 Å/px growing with the noise level."""
    s = float(np.clip(0.8 + 6.0 * sigma_norm, 0.8, 2.5))
    return ndimage.gaussian_filter(x, s, mode="reflect")


def gate_weights(W: np.ndarray, features: np.ndarray, available: np.ndarray) -> np.ndarray:
    logits = W @ features
    logits = np.where(available, logits, -np.inf)
    logits = logits - np.max(logits)
    w = np.exp(logits)
    return w / w.sum()


def features_of(sigma_norm: float, periodicity: float, idpc: bool) -> np.ndarray:
    return np.array([1.0, math.log10(max(sigma_norm, 1e-4)), float(periodicity), 1.0 if idpc else 0.0])


def expert_outputs(x: np.ndarray, model: DenoiserModel, sigma_norm: float, idpc: bool, lattice,
                   keep_aperiodic: bool = True, kmax_px: float | None = None) -> dict:
    out = {"cnn": band_limit(run_cnn(model.net, x, sigma_norm, idpc), kmax_px), "gauss": gauss_expert(x, sigma_norm)}
    if lattice is not None:
        out["bragg"] = band_limit(bragg_filter(x, lattice.reciprocal_px, keep_aperiodic=keep_aperiodic), kmax_px)
    return out


# ------------------------------------------------------------------------------------------------ API


def _measure(img: StemImage):
    from ..lattice.measure import measure_lattice

    try:
        return measure_lattice(img)
    except (LatticeNotFound, ImageError):
        return None


def _measure_model_sampled(x: np.ndarray, model_px: float, microscope):
    """Lattice of the (central ``LATTICE_CROP``² of the) model-sampled image; reciprocal_px in its cycles/px."""
    ny, nx = x.shape
    cy, cx = min(ny, LATTICE_CROP), min(nx, LATTICE_CROP)
    r0, c0 = (ny - cy) // 2, (nx - cx) // 2
    crop = x[r0:r0 + cy, c0:c0 + cx]
    if min(crop.shape) < 32:
        return None
    return _measure(StemImage(data=crop, pixel_size_A=model_px, microscope=microscope))


def denoise(image: StemImage, *, model: DenoiserModel | None = None, setting: str = "auto",
            keep_aperiodic: bool = True, lattice=None, return_experts: bool = False) -> DenoiseResult:
    """Denoise ``image`` with the mixture of experts (see the module doc).

    ``setting``: ``"auto"`` (the gate decides), ``"light"`` (no Bragg averaging: nothing periodic is
    imposed, safest for defects), ``"strong"`` (Bragg filter weighted at least 0.5 when a lattice is
    found, residual kept only if ``keep_aperiodic``), ``"none"`` (returns the input). ``lattice`` may be a
    ``MeasuredLattice`` of *this* image (at its own sampling) to skip measuring it again.
    """
    if not isinstance(image, StemImage):
        raise ImageError(f"denoise needs a StemImage, got {type(image).__name__}")
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    image.validate()
    data = np.asarray(image.data, dtype=np.float64)
    sigma_raw = noise_sigma(data)
    if setting == "none":
        return DenoiseResult(image=image, gate_weights=MappingProxyType({"identity": 1.0}), noise_sigma=sigma_raw,
                             setting=setting)
    model = model or default_model()
    mpx = model.pixel_size_A
    off, scale = robust_normalisation(data)
    x0 = (data - off) / scale
    shape_m = _model_shape(data.shape, image.pixel_size_A, mpx)
    x = resample_to(x0, shape_m)
    sig_n = noise_sigma(x)
    idpc = image.microscope.mode in ("idpc", "dpc")
    lat_m = None
    if setting != "light":
        if lattice is not None:
            # a lattice measured on this image: cycles/px of the model-sampled image
            fac = np.array([data.shape[0] / shape_m[0], data.shape[1] / shape_m[1]])
            recip = np.asarray(lattice.reciprocal_px) * fac[None, :]
            periodicity = float(lattice.periodicity)
        else:
            lattice = _measure_model_sampled(x, mpx, image.microscope)
            recip = None if lattice is None else np.asarray(lattice.reciprocal_px)
            periodicity = 0.0 if lattice is None else float(lattice.periodicity)
        if recip is not None:
            lat_m = type("L", (), {"reciprocal_px": recip})()
    else:
        periodicity = 0.0 if lattice is None else float(lattice.periodicity)
    feats = features_of(sig_n, periodicity, idpc)
    ex = expert_outputs(x, model, sig_n, idpc, lat_m,
                        keep_aperiodic=keep_aperiodic or setting == "auto" or setting == "light",
                        kmax_px=probe_band_limit_px(image.microscope, mpx))
    if setting == "strong" and "bragg" in ex and not keep_aperiodic:
        ex["bragg"] = band_limit(bragg_filter(x, lat_m.reciprocal_px, keep_aperiodic=False),
                                 probe_band_limit_px(image.microscope, mpx))
    avail = np.array([e in ex for e in EXPERTS])
    w = gate_weights(model.gate_W, feats, avail)
    if setting == "strong" and avail[EXPERTS.index("bragg")]:
        ib = EXPERTS.index("bragg")
        if w[ib] < 0.5:
            rest = w.copy()
            rest[ib] = 0.0
            w = 0.5 * rest / max(rest.sum(), 1e-12)
            w[ib] = 0.5
    y = sum(w[i] * ex[e] for i, e in enumerate(EXPERTS) if e in ex)
    y = resample_to(y, data.shape) * scale + off
    md = dict(image.metadata)
    md["denoise"] = {"setting": setting, "gate_weights": {e: float(w[i]) for i, e in enumerate(EXPERTS)},
                     "noise_sigma": sigma_raw, "model_sha256": model.sha256, "keep_aperiodic": bool(keep_aperiodic)}
    out = image.replace(data=y.astype(np.float32), metadata=md, dose_e_per_A2=image.dose_e_per_A2)
    return DenoiseResult(
        image=out,
        gate_weights=MappingProxyType({e: float(w[i]) for i, e in enumerate(EXPERTS)}),
        noise_sigma=sigma_raw,
        setting=setting,
        features=MappingProxyType(dict(zip(GATE_FEATURES, (float(v) for v in feats)))),
        lattice=lattice,
        model_sha256=model.sha256,
        experts=MappingProxyType({k: resample_to(v, data.shape) * scale + off for k, v in ex.items()})
        if return_experts else None,
    )
