"""Lattice of an image: FFT measurement, scan distortion and pixel-size check."""

from .distortion import Distortion, estimate_distortion, undistort_image, undistort_points
from .measure import MeasuredLattice, measure_lattice

__all__ = [
    "Distortion",
    "MeasuredLattice",
    "estimate_distortion",
    "measure_lattice",
    "undistort_image",
    "undistort_points",
]
