"""``StemImage``: an image that carries its calibration.

Like abTEM's measurements, the array never travels without its sampling and the optics that made it, so
no stage downstream can silently assume 0.1 Å/px. ``image[row, col]``: row is y, col is x; the pixel size
is given per axis as ``(y, x)`` because real scans are rarely square in physical units.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from ..errors import CalibrationError, ImageError
from .microscope import Microscope

MIN_SIZE_PX = 32
#: pixel-size tolerance of an image whose metadata does not state one (``StemImage.pixel_size_tolerance``)
DEFAULT_PIXEL_SIZE_TOLERANCE = 0.05


def _as_pixel_size(value) -> tuple[float, float]:
    if value is None:
        raise CalibrationError("the image has no pixel size; give one (e.g. --pixel-size 0.1 for 0.1 Å/px)")
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise CalibrationError(f"pixel size must be one or two positive numbers in Å, got {value!r}")
    if np.any(arr > 50.0) or np.any(arr < 1e-3):
        raise CalibrationError(
            f"pixel size ({arr[0]:.4g}, {arr[1]:.4g}) Å is implausible for atomic resolution (expected 0.001–50 Å/px); "
            "is it in nm or pm?"
        )
    return (float(arr[0]), float(arr[1]))


@dataclass(frozen=True)
class StemImage:
    """A 2D STEM image with calibration.

    ``dose_e_per_A2`` is the electron dose if known (simulated images always know it). ``sha256`` is the
    hash of the source file when read from disk, else of the array, so provenance can tell images apart.
    """

    data: np.ndarray
    pixel_size_A: tuple[float, float]
    microscope: Microscope = field(default_factory=Microscope)
    dose_e_per_A2: float | None = None
    source: str | None = None
    sha256: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        data = np.asarray(self.data)
        if data.ndim != 2:
            raise ImageError(f"a STEM image must be 2D, got an array of shape {data.shape}")
        if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
            raise ImageError(f"image pixels must be real numbers, got dtype {data.dtype}")
        data = np.ascontiguousarray(data, dtype=np.float32)
        data.setflags(write=False)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "pixel_size_A", _as_pixel_size(self.pixel_size_A))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        if self.sha256 is None:
            object.__setattr__(self, "sha256", hashlib.sha256(data.tobytes()).hexdigest())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def field_of_view_A(self) -> tuple[float, float]:
        return (self.shape[0] * self.pixel_size_A[0], self.shape[1] * self.pixel_size_A[1])

    @property
    def detector_angle_deg(self) -> float:
        """Orientation of a segmented detector's x axis (segment A) in the image, counter-clockwise from the scan's
        x axis (columns). A 4-segment detector transfers reflections unequally by direction (5–10 %), so a model
        of the image must know it; simulations record it (metadata ``detector_angle_deg``), and a real image is
        taken to have its detector aligned with the scan unless its metadata says otherwise."""
        return float(self.metadata.get("detector_angle_deg", 0.0) or 0.0)

    @property
    def pixel_size_tolerance(self) -> float:
        """Relative error the stated pixel size may carry (0.05 = ±5 %), from metadata ``pixel_size_tolerance``.

        A lattice that is uniformly a few per cent larger or smaller than a template's is a calibration error
        as much as strain; how much of it the ranking forgives and the built cell puts on the calibration depends on
        how well the pixel size is known. Simulations know it exactly (0, also recorded in their metadata); any other image without
        the entry gets ``DEFAULT_PIXEL_SIZE_TOLERANCE`` (magnification calibrations are typically good to a few
        per cent)."""
        value = self.metadata.get("pixel_size_tolerance")
        if value is None:
            return 0.0 if self.source == "simulation" else DEFAULT_PIXEL_SIZE_TOLERANCE
        try:
            tol = abs(float(value))
        except (TypeError, ValueError):
            raise ImageError(f"metadata pixel_size_tolerance {value!r} is not a number (a fraction: 0.05 for ±5 %)") from None
        if not tol < 1.0:
            raise ImageError(f"metadata pixel_size_tolerance {value!r} is not a fraction below 1 (0.05 for ±5 %)")
        return tol

    def replace(self, **changes) -> "StemImage":
        """A copy with some fields changed; a new array gets a new hash unless one is given."""
        if "data" in changes and "sha256" not in changes:
            changes["sha256"] = None
        return dataclasses.replace(self, **changes)

    def validate(self) -> "StemImage":
        """Reject images no analysis can use, with a message that says why."""
        data = self.data
        check_pixels(data)
        low, high = float(data.min()), float(data.max())
        # compared in float64: the float32 difference of ±3e38 overflows to inf and would pass as "not blank"
        if high - low <= 1e-12 * max(1.0, abs(low), abs(high)):
            raise ImageError("image is blank (all pixels have the same value)")
        self.pixel_size_tolerance  # noqa: B018 - a malformed entry is refused here, before anything is stored
        return self


def check_pixels(data: np.ndarray) -> None:
    """Size and finiteness, the checks a frame stack must pass *before* it is aligned and summed.

    ``data`` is an image or a (frames, y, x) stack: NaN frames or 8-px-wide frames would otherwise fail deep
    inside the cross-correlation with a message about FFTs instead of about the file.
    """
    ny, nx = data.shape[-2:]
    if min(ny, nx) < MIN_SIZE_PX:
        raise ImageError(f"image is {ny}×{nx} px; at least {MIN_SIZE_PX} px per side is needed")
    finite = np.isfinite(data)
    if not finite.all():
        raise ImageError(f"image has {int(finite.size - np.count_nonzero(finite))} NaN/inf pixel(s)")
