"""Image physics: reading files, the microscope, multislice and fast simulation, dose noise."""

from .image import StemImage
from .microscope import MODES, Microscope

__all__ = ["MODES", "Microscope", "StemImage"]
