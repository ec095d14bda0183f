"""The microscope that took (or simulates) an image.

One frozen ``Microscope`` flows through simulation, library building, retrieval and verification so that a
template is always simulated the way the observed image was taken. Units: kV, mrad, Å.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MODES = ("idpc", "dpc", "haadf", "adf", "abf", "bf")

#: Modes whose contrast is incoherent (annular detectors): intensity grows with Z, no contrast reversal.
ANNULAR_MODES = ("haadf", "adf")
#: Modes whose contrast follows the projected electrostatic potential (phase contrast).
PHASE_MODES = ("idpc", "dpc")


def _default_detector(mode: str, semiangle_mrad: float) -> tuple[float, float]:
    """Detector collection angles conventionally used for each mode.

    Annular detectors are placed well outside the bright field disc; ABF collects the outer half of the
    bright field disc; DPC segments cover a ring inside the disc (as on commercial 4-segment detectors).
    """
    if mode == "haadf":
        return (max(70.0, 2.5 * semiangle_mrad), 200.0)
    if mode == "adf":
        return (max(40.0, 1.5 * semiangle_mrad), 200.0)
    if mode == "abf":
        return (0.5 * semiangle_mrad, semiangle_mrad)
    if mode == "bf":
        return (0.0, 0.5 * semiangle_mrad)
    return (0.25 * semiangle_mrad, semiangle_mrad)


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength in Å."""
    m0c2_keV = 510.99895
    h_c_keVA = 12.398419843320026
    e_keV = voltage_kV
    return h_c_keVA / math.sqrt(e_keV * (2.0 * m0c2_keV + e_keV))


@dataclass(frozen=True)
class Microscope:
    """Probe-forming optics and detector geometry of a STEM.

    ``defocus_A`` follows abTEM's sign convention (``defocus = -C10``; positive is underfocus).
    ``source_size_A`` is the FWHM of the Gaussian effective source (partial spatial coherence); real
    instruments have 0.3–0.8 Å and it visibly softens columns, so templates for real images set it.
    """

    mode: str = "haadf"
    voltage_kV: float = 300.0
    semiangle_mrad: float = 25.0
    defocus_A: float = 0.0
    Cs_A: float = 0.0
    detector_inner_mrad: float | None = None
    detector_outer_mrad: float | None = None
    source_size_A: float = 0.0

    def __post_init__(self):
        mode = str(self.mode).lower()
        if mode not in MODES:
            raise ValueError(f"unknown imaging mode {self.mode!r}; choose one of {', '.join(MODES)}")
        object.__setattr__(self, "mode", mode)
        if not (1.0 <= self.voltage_kV <= 2000.0):
            raise ValueError(f"accelerating voltage {self.voltage_kV} kV is outside 1–2000 kV")
        if not (1.0 <= self.semiangle_mrad <= 200.0):
            raise ValueError(f"convergence semiangle {self.semiangle_mrad} mrad is outside 1–200 mrad")
        inner, outer = _default_detector(mode, self.semiangle_mrad)
        if self.detector_inner_mrad is None:
            object.__setattr__(self, "detector_inner_mrad", float(inner))
        if self.detector_outer_mrad is None:
            object.__setattr__(self, "detector_outer_mrad", float(outer))
        if not (0.0 <= self.detector_inner_mrad < self.detector_outer_mrad):
            raise ValueError(
                f"detector angles must satisfy 0 <= inner < outer, got {self.detector_inner_mrad}, "
                f"{self.detector_outer_mrad} mrad"
            )
        if self.source_size_A < 0:
            raise ValueError("source_size_A must be >= 0")

    @property
    def wavelength_A(self) -> float:
        return electron_wavelength_A(self.voltage_kV)

    @property
    def resolution_A(self) -> float:
        """Diffraction-limited probe size (λ/α): structure finer than this is not in the image."""
        return self.wavelength_A / (self.semiangle_mrad * 1e-3)

    @property
    def is_annular(self) -> bool:
        return self.mode in ANNULAR_MODES

    def replace(self, **changes) -> "Microscope":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Microscope":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown microscope parameter(s): {', '.join(sorted(unknown))}")
        return cls(**data)
