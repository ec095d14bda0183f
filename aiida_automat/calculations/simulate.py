"""``SimulateCalculation``: a STEM image of a structure, simulated by ``automat-exec simulate``.

Simulation runs as a CalcJob rather than a calcfunction because multislice is the expensive step of the
template library and must be able to run on a cluster node; the job only needs the package installed.
Parameters are checked at submission with the same function the executable uses
(``cli.stage_simulate.check_parameters``), so a typo fails before anything is queued.
"""

from __future__ import annotations

from aiida import orm

from ..cli.stage_simulate import DEFAULTS, IMAGE_FILE, MICROSCOPE_KEYS, STRUCTURE_FILE, check_parameters
from ..data.stem_image import StemImageData
from .base import AutomatCalcJob, dict_input, validator_from_check

PARAMETERS_HELP = (
    "Simulation settings, all optional. Microscope: "
    + ", ".join(MICROSCOPE_KEYS)
    + " (kV, mrad, Å; see imaging.microscope.Microscope), or the same as a nested 'microscope' dict. "
    "Image: pixel_size_A (Å/px, one number or [y, x]), shape [rows, cols], rotation_deg (counter-clockwise), "
    "offset_A [x, y] in Å (the order of imaging.simulate.simulate_image), strain (number = biaxial, or a 2x2 "
    "in-plane tensor), distortion (dict of imaging.noise.ScanDistortion fields), method ('multislice' | "
    "'fast'), dose_e_per_A2 (null = noise-free), seed (int, default 0 so runs are reproducible). "
    f"Defaults: {DEFAULTS}."
)


# a lambda, so the check is looked up when called (tests replace it to exercise the executable's own check)
validate_parameters = validator_from_check(lambda parameters: check_parameters(parameters))


def validate_structure(value, _ctx=None):
    if value is not None and len(value.sites) == 0:
        return "the structure has no atoms"
    return None


class SimulateCalculation(AutomatCalcJob):
    """Simulate a STEM image of ``structure`` with the optics and sampling in ``parameters``."""

    _stage = "simulate"
    _output_files = (IMAGE_FILE,)
    CACHE_VERSION = 1  # see AutomatCalcJob
    _default_parser = "automat.simulate"

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input(
            "structure",
            valid_type=orm.StructureData,
            validator=validate_structure,
            help="The structure to image; layer normal along z, the beam travels along -z.",
        )
        spec.input(
            "parameters",
            valid_type=orm.Dict,
            required=False,
            validator=validate_parameters,
            help=PARAMETERS_HELP,
        )
        spec.output("image", valid_type=StemImageData, help="The simulated image with its calibration and optics.")

    def stage_parameters(self) -> dict:
        params = check_parameters(dict_input(self.inputs.get("parameters")))
        params.update(structure_file=STRUCTURE_FILE, output_file=IMAGE_FILE)
        return params

    def write_stage_inputs(self, folder) -> list:
        import ase.io

        atoms = self.inputs.structure.get_ase()
        with folder.open(STRUCTURE_FILE, "w", encoding="utf8") as handle:
            ase.io.write(handle, atoms, format="extxyz")
        return []
