"""Image physics: reading files, the microscope, multislice and fast simulation, dose noise."""

from .image import StemImage
from .microscope import MODES, Microscope

__all__ = ["MODES", "Microscope", "ScanDistortion", "StemImage", "apply_dose", "fast_image", "simulate_image"]

_LAZY = {
    "simulate_image": ".simulate",
    "fast_image": ".fastsim",
    "ScanDistortion": ".noise",
    "apply_dose": ".noise",
}


def __getattr__(name):
    # lazy so that ``import aiida_automat.imaging`` stays cheap (abTEM is only imported when simulating)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
