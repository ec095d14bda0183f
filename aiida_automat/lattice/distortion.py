"""Scan distortion and pixel-size check from a measured lattice.

The assumption, stated once: **one image cannot separate sample strain from scan distortion or from a
wrong pixel size** — all three are an affine map of the lattice. We assume the crystal is the *nearest
higher-symmetry Bravais lattice* (hexagonal, square, rectangular, centred-rectangular) whenever the
measured cell is within ``max_distortion`` (default 15 %) of one, and attribute the whole deviation to
the instrument (scan distortion + calibration). Consequences a user must know:

* a genuinely strained or lower-symmetry crystal within 15 % of a higher symmetry will be "corrected"
  into that symmetry (pass ``bravais="oblique"`` or a ``template`` to avoid it);
* without an expected lattice constant only the *shape* is corrected (the map has determinant 1) and the
  pixel size cannot be checked; with ``expected_a_A`` or a ``template`` the isotropic scale is the
  calibration error.

``matrix`` ``T`` acts on column vectors in Å with components ``(row, col)``: ``corrected = T @ measured``.
It is symmetric positive definite — a pure stretch; lattice rotation is not a distortion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..jsonable import AsDict
from scipy import ndimage

from ..errors import CalibrationError
from ..imaging.image import StemImage
from .measure import MeasuredLattice, cell_parameters, reduce_basis

BRAVAIS = ("hexagonal", "square", "rectangular", "centred-rectangular", "oblique")


@dataclass(frozen=True, eq=False)
class Distortion(AsDict):
    """Affine correction from the measured lattice to the assumed ideal one (see module doc).

    ``anisotropy_pct`` is the ratio of the principal stretches minus one; ``principal_angle_deg`` the
    direction (from +col towards +row, mod 180°) along which the *image* is stretched most;
    ``shear_pct`` the off-diagonal of ``T`` over its scale; ``scale`` = √det T (1 for a shape-only
    correction). ``implied_pixel_size_A`` is per image axis (y, x) and ``calibration_error_pct`` is
    ``claimed / implied − 1`` (negative: the claimed pixel is too small).
    """

    matrix: np.ndarray
    bravais: str
    deviation: float
    anisotropy_pct: float
    principal_angle_deg: float
    shear_pct: float
    scale: float
    measured_vectors_A: np.ndarray
    corrected_vectors_A: np.ndarray
    a_A: float
    b_A: float
    gamma_deg: float
    pixel_size_A: tuple[float, float]
    implied_pixel_size_A: tuple[float, float] | None = None
    implied_pixel_size_iso_A: float | None = None
    calibration_error_pct: float | None = None

    @property
    def inverse(self) -> np.ndarray:
        return np.linalg.inv(self.matrix)



def _sqrtm_spd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def _stretch(measured: np.ndarray, ideal_metric: np.ndarray) -> np.ndarray:
    """Symmetric T with (T a_i)·(T a_j) = G_ij: T² = A⁻¹ G A⁻ᵀ (A rows = measured vectors)."""
    ainv = np.linalg.inv(measured)
    return _sqrtm_spd(ainv @ ideal_metric @ ainv.T)


def _ideal_metrics(vec: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest ideal metric of each symmetry with the measured cell area (shape-only correction)."""
    g = vec @ vec.T
    det = float(np.linalg.det(g))
    l1, l2 = g[0, 0], g[1, 1]
    out = {}
    a2 = math.sqrt(det / 0.75)
    out["hexagonal"] = a2 * np.array([[1.0, -0.5], [-0.5, 1.0]])
    out["square"] = math.sqrt(det) * np.eye(2)
    out["rectangular"] = np.diag([l1, l2]) * math.sqrt(det / (l1 * l2))
    # Centred rectangular: its reduced cell is a rhombus (|a1| = |a2|) or has a1·a2 = -|a1|²/2.
    cosg = g[0, 1] / math.sqrt(l1 * l2)
    sin2 = 1.0 - cosg**2
    rh = math.sqrt(det / sin2) * np.array([[1.0, cosg], [cosg, 1.0]])
    alt = np.array([[l1, -0.5 * l1], [-0.5 * l1, l2]])
    alt *= math.sqrt(det / np.linalg.det(alt)) if np.linalg.det(alt) > 0 else 1.0
    out["centred-rectangular"] = (rh, alt)
    return out


def _deviation(t: np.ndarray) -> float:
    """Largest principal stretch of the shape part of T (its determinant divided out), as a fraction."""
    w = np.linalg.eigvalsh(t / math.sqrt(abs(np.linalg.det(t))))
    return float(np.max(np.abs(w - 1.0)))


def _template_metric(template, vec_meas: np.ndarray) -> np.ndarray:
    t = np.asarray(template, dtype=float)
    if t.shape == (3,):
        a, b, gam = t
        g = math.radians(gam)
        t = np.array([[a, 0.0], [b * math.cos(g), b * math.sin(g)]])
    if t.shape != (2, 2):
        raise ValueError("template must be a 2×2 basis (rows, Å) or (a, b, gamma_deg)")
    t = reduce_basis(t) @ t
    # Same handedness-free metric; order matches the measured reduced cell when distortion is modest.
    return t @ t.T


def estimate_distortion(
    lattice: MeasuredLattice,
    *,
    expected_a_A: float | None = None,
    template=None,
    bravais: str | None = None,
    max_distortion: float = 0.15,
) -> Distortion:
    """Affine scan distortion (and, with a reference length, the pixel-size error) of ``lattice``.

    ``bravais`` forces the symmetry (``"oblique"`` disables the correction); otherwise the highest
    symmetry within ``max_distortion`` is assumed (module doc). ``expected_a_A`` sets the length of the
    corrected ``a`` (for hexagonal/square, the lattice constant); ``template`` gives a full reference cell
    (2×2 basis in Å or ``(a, b, gamma_deg)``) and overrides the symmetry choice.
    """
    if bravais is not None and bravais not in BRAVAIS:
        raise ValueError(f"unknown Bravais lattice {bravais!r}; choose one of {', '.join(BRAVAIS)}")
    vec = np.asarray(lattice.vectors_A, dtype=float)
    vec = reduce_basis(vec) @ vec
    if template is not None:
        metric = _template_metric(template, vec)
        kind = bravais or "template"
        t = _stretch(vec, metric)
    else:
        metrics = _ideal_metrics(vec)
        cands = []
        for name in ("hexagonal", "square", "rectangular", "centred-rectangular"):
            ms = metrics[name] if isinstance(metrics[name], tuple) else (metrics[name],)
            for m in ms:
                tt = _stretch(vec, m)
                cands.append((name, _deviation(tt), tt))
        if bravais is not None:
            if bravais == "oblique":
                kind, t = "oblique", np.eye(2)
            else:
                kind, _, t = min((c for c in cands if c[0] == bravais), key=lambda c: c[1])
        else:
            kind, t = "oblique", np.eye(2)
            for level in (("hexagonal", "square"), ("rectangular", "centred-rectangular")):
                best = min((c for c in cands if c[0] in level), key=lambda c: c[1])
                if best[1] <= max_distortion:
                    kind, _, t = best
                    break
        if expected_a_A is not None:
            la = float(np.linalg.norm(t @ vec[0]))
            t = t * (float(expected_a_A) / la)
    corrected = vec @ t.T
    dev = _deviation(t)
    if template is not None and dev > max_distortion:
        raise CalibrationError(
            f"the measured cell differs from the template by {100 * dev:.1f} % in shape "
            f"(more than {100 * max_distortion:.0f} %): wrong template or strongly distorted image"
        )
    w, v = np.linalg.eigh(t)
    s_small, s_big = float(w[0]), float(w[1])
    # Report the distortion *of the image* (T⁻¹): its largest stretch is along T's smallest eigenvector.
    ev = v[:, 0]
    angle = math.degrees(math.atan2(ev[0], ev[1])) % 180.0
    scale = math.sqrt(abs(np.linalg.det(t)))
    la, lb, gam = cell_parameters(corrected)
    py, px = lattice.pixel_size_A
    implied = implied_iso = cal = None
    if expected_a_A is not None or template is not None:
        implied = (py * float(np.linalg.norm(t[:, 0])), px * float(np.linalg.norm(t[:, 1])))
        implied_iso = math.sqrt(py * px) * scale
        cal = (math.sqrt(py * px) / implied_iso - 1.0) * 100.0
    return Distortion(
        matrix=t,
        bravais=kind,
        deviation=dev,
        anisotropy_pct=(s_big / s_small - 1.0) * 100.0,
        principal_angle_deg=angle,
        shear_pct=float(t[0, 1] / scale) * 100.0,
        scale=scale,
        measured_vectors_A=vec,
        corrected_vectors_A=corrected,
        a_A=la,
        b_A=lb,
        gamma_deg=gam,
        pixel_size_A=(py, px),
        implied_pixel_size_A=implied,
        implied_pixel_size_iso_A=implied_iso,
        calibration_error_pct=cal,
    )


def undistort_points(points_px: np.ndarray, distortion: Distortion, pixel_size_A=None, *, origin_px=(0.0, 0.0)) -> np.ndarray:
    """Corrected positions in Å ``(row, col)`` of image points given in px, about ``origin_px``."""
    pix = np.asarray(distortion.pixel_size_A if pixel_size_A is None else pixel_size_A, dtype=float)
    pts = (np.asarray(points_px, dtype=float) - np.asarray(origin_px)) * pix
    return pts @ distortion.matrix.T


def undistort_image(image: StemImage, distortion: Distortion, *, pixel_size_A: float | None = None, order: int = 3) -> StemImage:
    """Resample ``image`` onto a square grid in the corrected frame (same centre, same shape).

    The output pixel size defaults to the implied isotropic pixel size when a reference length was given,
    else to the geometric mean of the claimed ones (shape-only correction).
    """
    py, px = image.pixel_size_A
    if pixel_size_A is None:
        pixel_size_A = distortion.implied_pixel_size_iso_A or math.sqrt(py * px)
    ny, nx = image.shape
    p = float(pixel_size_A)
    # output px -> corrected Å (×p) -> measured Å (T⁻¹) -> input px (÷ claimed pixel size)
    m = np.diag([1.0 / py, 1.0 / px]) @ distortion.inverse @ np.diag([p, p])
    centre = np.array([(ny - 1) / 2.0, (nx - 1) / 2.0])
    offset = centre - m @ centre
    data = ndimage.affine_transform(np.asarray(image.data, dtype=np.float64), m, offset=offset, order=order, mode="reflect")
    meta = dict(image.metadata)
    meta["undistorted"] = {"matrix": distortion.matrix.tolist(), "bravais": distortion.bravais}
    return image.replace(data=data, pixel_size_A=(p, p), metadata=meta)
