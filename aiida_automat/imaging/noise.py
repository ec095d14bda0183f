"""What the instrument does to an ideal image: counting noise at finite dose and scan distortions.

Noise is applied to *detector signals* (fractions of the incident beam), not to a display image, so the
counts per pixel are physical: λ = dose × pixel area × signal. iDPC is noisy because its four segments
are; the segments are noised separately and the differences re-integrated, which reproduces the
characteristic low-frequency (1/q) noise of real iDPC images.

Scan distortions are described on the *sampling positions* (where the probe really was for each pixel),
which the Fourier-series renderer evaluates exactly; ``apply_scan_distortion`` is an approximate helper
for arrays that are already images (real data augmentation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..errors import SimulationError

__all__ = ["ScanDistortion", "apply_dose", "apply_scan_distortion", "integrate_dpc", "scan_positions"]


@dataclass(frozen=True)
class ScanDistortion:
    """Where the probe really lands compared with the nominal raster.

    For nominal pixel (row i, col j) at (x, y) = (j·sx, i·sy), the specimen point sampled is
    ``matrix @ (x, y) + i·drift_A_per_line + j·drift_A_per_line/cols + (jitter_x_i, jitter_y_i)``,
    where ``matrix = [[scale_x, shear], [0, scale_y]]`` (calibration error and non-orthogonal scan
    coils), the drift is a constant specimen drift in Å per scan line, and jitter is a random offset per
    scan line (flyback / line-sync noise) with standard deviations in pixels.
    """

    scale_x: float = 1.0
    scale_y: float = 1.0
    shear: float = 0.0
    line_jitter_px: float = 0.0
    line_jitter_y_px: float = 0.0
    drift_A_per_line: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if not (0.5 <= self.scale_x <= 2.0 and 0.5 <= self.scale_y <= 2.0):
            raise SimulationError(f"scan scale ({self.scale_x}, {self.scale_y}) is outside 0.5–2")
        if abs(self.shear) > 0.5:
            raise SimulationError(f"scan shear {self.shear} is outside ±0.5")
        if self.line_jitter_px < 0 or self.line_jitter_y_px < 0:
            raise SimulationError("line jitter must be ≥ 0 px")
        drift = tuple(float(v) for v in self.drift_A_per_line)
        if len(drift) != 2:
            raise SimulationError("drift_A_per_line must be (dx, dy) in Å per line")
        object.__setattr__(self, "drift_A_per_line", drift)

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.scale_x, self.shear], [0.0, self.scale_y]], dtype=float)

    @property
    def needs_rng(self) -> bool:
        return self.line_jitter_px > 0 or self.line_jitter_y_px > 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def scan_positions(shape, pixel_size_A, distortion: ScanDistortion | None = None, rng=None):
    """Separable sampling positions: per-line origins R_i (rows × 2, (x, y) Å) and the fast-scan step v.

    Returns ``(rows_xy, step_xy, linear)`` where pixel (i, j) samples ``rows_xy[i] + j * step_xy`` and
    ``linear`` is the 2×2 map from nominal to true positions without jitter (for the apparent lattice).
    """
    rows, cols = int(shape[0]), int(shape[1])
    sy, sx = float(pixel_size_A[0]), float(pixel_size_A[1])
    d = distortion or ScanDistortion()
    A = d.matrix
    drift = np.asarray(d.drift_A_per_line, dtype=float)
    step = A @ np.array([sx, 0.0]) + drift / cols
    i = np.arange(rows, dtype=float)
    origins = np.outer(i, A @ np.array([0.0, sy])) + np.outer(i, drift)
    if d.needs_rng:
        if rng is None:
            raise SimulationError("scan jitter needs an rng (numpy Generator)")
        jit = rng.normal(size=(rows, 2)) * np.array([d.line_jitter_px * sx, d.line_jitter_y_px * sy])
        origins = origins + jit
    linear = A + np.column_stack([drift / (cols * sx), drift / sy])
    return origins, step, linear


def _as_pixel_area(pixel_size_A) -> float:
    px = np.atleast_1d(np.asarray(pixel_size_A, dtype=float))
    if px.size == 1:
        px = np.repeat(px, 2)
    if px.size != 2 or np.any(px <= 0) or not np.all(np.isfinite(px)):
        raise SimulationError(f"pixel size must be one or two positive numbers in Å, got {pixel_size_A!r}")
    return float(px[0] * px[1])


def apply_dose(image_or_signals, dose_e_per_A2, pixel_size_A, rng, detector_fraction: float = 1.0):
    """Poisson counting noise for signals given as fractions of the incident beam.

    Expected counts per pixel are dose × pixel area × ``detector_fraction`` × signal; the result is
    returned in the same (fraction) units, so its mean is unchanged and its variance falls as 1/dose.
    ``image_or_signals`` may be one array or a dict of arrays (e.g. the four DPC segments), which are
    noised independently. Negative signals (possible from truncated models) count as zero electrons.
    """
    if rng is None or not isinstance(rng, np.random.Generator):
        raise SimulationError("apply_dose needs a numpy Generator (rng) for reproducible noise")
    dose = float(dose_e_per_A2)
    if not math.isfinite(dose) or dose <= 0:
        raise SimulationError(f"dose must be a positive number of e/Å², got {dose_e_per_A2!r}")
    electrons = dose * _as_pixel_area(pixel_size_A) * float(detector_fraction)
    if electrons <= 0:
        raise SimulationError("detector_fraction must be > 0")

    def one(signal):
        sig = np.asarray(signal, dtype=float)
        lam = np.clip(sig, 0.0, None) * electrons
        return rng.poisson(lam).astype(float) / electrons

    if isinstance(image_or_signals, dict):
        return {k: one(image_or_signals[k]) for k in sorted(image_or_signals)}
    return one(image_or_signals)


def integrate_dpc(dx, dy, pixel_size_A) -> np.ndarray:
    """Fourier integration of a DPC vector field (image frame, row = y) into iDPC, zero mean.

    Like the instrument software, this treats the field of view as periodic; callers that already have
    a seamless noise-free iDPC integrate only the noise, where periodicity costs nothing.
    """
    dx = np.asarray(dx, dtype=float)
    dy = np.asarray(dy, dtype=float)
    sy, sx = (float(v) for v in np.broadcast_to(np.asarray(pixel_size_A, dtype=float), (2,)))
    ky = np.fft.fftfreq(dx.shape[0], d=sy)[:, None]
    kx = np.fft.fftfreq(dx.shape[1], d=sx)[None, :]
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    F = (np.fft.fft2(dx) * kx + np.fft.fft2(dy) * ky) / (2j * np.pi * k2)
    F[0, 0] = 0.0
    return np.fft.ifft2(F).real


def apply_scan_distortion(image, distortion: ScanDistortion, pixel_size_A, rng=None) -> np.ndarray:
    """Resample an existing image as if scanned with ``distortion`` (cubic spline, reflect at edges).

    Approximate (interpolation of pixels, edges reflected); simulated images should pass the distortion
    to ``simulate_image`` instead, which applies it exactly to the sampling positions.
    """
    from scipy.ndimage import map_coordinates

    img = np.asarray(image, dtype=float)
    px = np.broadcast_to(np.asarray(pixel_size_A, dtype=float), (2,))
    origins, step, _ = scan_positions(img.shape, px, distortion, rng)
    j = np.arange(img.shape[1])
    pts = origins[:, None, :] + j[None, :, None] * step[None, None, :]
    coords = np.stack([pts[..., 1] / px[0], pts[..., 0] / px[1]])
    return map_coordinates(img, coords, order=3, mode="reflect")
