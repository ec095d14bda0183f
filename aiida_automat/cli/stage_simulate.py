"""``automat-exec simulate``: simulate a STEM image of a structure, on whatever computer runs the job.

Reads ``structure.extxyz`` and the parameters from ``parameters.json``, calls the science core
(``imaging.simulate.simulate_image``) and writes ``image.npz`` in the native lossless format. The
parameter check lives here, next to its only real consumer, and the CalcJob spec imports it: inputs are
rejected with the same message before submission and, if someone edits ``parameters.json`` by hand, in
the job itself (``AutomatError`` → exit code 310).
"""

from __future__ import annotations

import dataclasses

import math
from numbers import Integral, Real

from ..imaging.microscope import Microscope
from ..errors import AutomatError, SimulationError

STRUCTURE_FILE = "structure.extxyz"
IMAGE_FILE = "image.npz"

MICROSCOPE_KEYS = tuple(f.name for f in dataclasses.fields(Microscope))
METHODS = ("multislice", "fast")

#: every simulation parameter with its default. ``seed`` defaults to 0, not None: a CalcJob must be
#: reproducible (and cacheable) from its inputs alone.
DEFAULTS = {
    "pixel_size_A": 0.1,
    "shape": [256, 256],
    "rotation_deg": 0.0,
    "offset_A": [0.0, 0.0],
    "strain": None,
    "method": "multislice",
    "dose_e_per_A2": None,
    "seed": 0,
    "distortion": None,
}
#: file names the CalcJob adds to ``parameters.json``; not simulation parameters.
RESERVED_KEYS = ("structure_file", "output_file")

MAX_PIXELS = 4096 * 4096


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _numbers(value, n: int, name: str) -> list[float]:
    if _is_number(value) and n == 2 and name == "pixel_size_A":
        return [float(value), float(value)]
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(_is_number(v) for v in value):
        raise AutomatError(f"simulate parameter {name} must be a list of {n} numbers, got {value!r}")
    return [float(v) for v in value]


def check_parameters(parameters: dict) -> dict:
    """Complete ``parameters`` with defaults and check them; raise ``AutomatError`` with one line.

    Returns the normalised parameters (JSON-able): what is written to ``parameters.json``.
    """
    from ..imaging.image import MIN_SIZE_PX
    from ..imaging.microscope import Microscope
    from ..imaging.noise import ScanDistortion
    from ..imaging.structures import strain_matrix

    if not isinstance(parameters, dict):
        raise AutomatError(f"simulate parameters must be a dictionary, got {type(parameters).__name__}")
    known = set(MICROSCOPE_KEYS) | set(DEFAULTS) | set(RESERVED_KEYS) | {"microscope"}
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise AutomatError(f"unknown simulate parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known - set(RESERVED_KEYS) - {'microscope'}))}")
    out = {**DEFAULTS, **{k: v for k, v in parameters.items() if k in DEFAULTS or k in RESERVED_KEYS}}

    nested = parameters.get("microscope") or {}
    if not isinstance(nested, dict):
        raise AutomatError(f"simulate parameter microscope must be a dictionary, got {nested!r}")
    microscope = {**nested, **{k: parameters[k] for k in MICROSCOPE_KEYS if k in parameters and parameters[k] is not None}}
    try:
        out["microscope"] = Microscope(**microscope).as_dict()
    except (TypeError, ValueError) as exc:
        raise AutomatError(f"invalid microscope parameters: {exc}") from None

    pixel = _numbers(out["pixel_size_A"], 2, "pixel_size_A")
    if not all(0.005 <= p <= 5.0 for p in pixel):
        raise AutomatError(f"pixel_size_A must be between 0.005 and 5 Å, got {out['pixel_size_A']!r}")
    out["pixel_size_A"] = pixel if pixel[0] != pixel[1] else pixel[0]

    shape = out["shape"]
    if isinstance(shape, Integral) and not isinstance(shape, bool):
        shape = [shape, shape]
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(s, Integral) and not isinstance(s, bool) for s in shape)):
        raise AutomatError(f"shape must be two integers (rows, cols), got {out['shape']!r}")
    if min(shape) < MIN_SIZE_PX or shape[0] * shape[1] > MAX_PIXELS:
        raise AutomatError(f"shape {list(shape)} must be at least {MIN_SIZE_PX} px per side and at most {MAX_PIXELS} px in all")
    out["shape"] = [int(shape[0]), int(shape[1])]

    if not _is_number(out["rotation_deg"]):
        raise AutomatError(f"rotation_deg must be a number, got {out['rotation_deg']!r}")
    out["rotation_deg"] = float(out["rotation_deg"])
    out["offset_A"] = _numbers(out["offset_A"], 2, "offset_A")

    try:  # the core's own checks, so the rules cannot drift apart; reported as invalid input (310)
        strain_matrix(out["strain"])
        if out["distortion"] is not None:
            if not isinstance(out["distortion"], dict):
                raise AutomatError(f"distortion must be a dictionary of ScanDistortion fields or null, got {out['distortion']!r}")
            ScanDistortion(**out["distortion"])
    except (SimulationError, TypeError, ValueError) as exc:
        raise AutomatError(f"invalid simulate parameters: {exc}") from None
    if out["strain"] is not None:
        out["strain"] = float(out["strain"]) if _is_number(out["strain"]) else [[float(v) for v in row] for row in out["strain"]]

    if out["method"] not in METHODS:
        raise AutomatError(f"method must be one of {', '.join(METHODS)}, got {out['method']!r}")
    dose = out["dose_e_per_A2"]
    if dose is not None and (not _is_number(dose) or float(dose) <= 0):
        raise AutomatError(f"dose_e_per_A2 must be a positive number or null (no noise), got {dose!r}")
    seed = out["seed"]
    if seed is not None and (not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0):
        raise AutomatError(f"seed must be a non-negative integer, got {seed!r}")
    return out


def run(parameters: dict) -> dict:
    import ase.io
    import numpy as np

    from ..imaging.io import json_safe, save_stem_image
    from ..imaging.microscope import Microscope
    from ..imaging.noise import ScanDistortion
    from ..imaging.simulate import simulate_image

    params = check_parameters(parameters)
    structure_file = params.get("structure_file", STRUCTURE_FILE)
    output_file = params.get("output_file", IMAGE_FILE)
    try:
        atoms = ase.io.read(structure_file, format="extxyz")
    except FileNotFoundError:
        raise AutomatError(f"structure file {structure_file} not found") from None
    except Exception as exc:  # noqa: BLE001 - ase raises many kinds for a bad file
        raise AutomatError(f"cannot read structure file {structure_file}: {type(exc).__name__}: {exc}") from None
    if len(atoms) == 0:
        raise AutomatError("the structure has no atoms")

    pixel = params["pixel_size_A"]
    image = simulate_image(
        atoms,
        Microscope.from_dict(params["microscope"]),
        pixel_size_A=tuple(pixel) if isinstance(pixel, list) else pixel,
        shape=tuple(params["shape"]),
        rotation_deg=params["rotation_deg"],
        offset_A=tuple(params["offset_A"]),
        strain=params["strain"],
        method=params["method"],
        dose_e_per_A2=params["dose_e_per_A2"],
        distortion=None if params["distortion"] is None else ScanDistortion(**params["distortion"]),
        rng=np.random.default_rng(params["seed"]),
    )
    if not np.all(np.isfinite(image.data)):
        raise SimulationError("the simulated image has NaN/inf pixels")
    simulation = {k: v for k, v in params.items() if k not in RESERVED_KEYS}
    image = image.replace(metadata=json_safe({**dict(image.metadata), "simulation": simulation}), sha256=image.sha256)
    save_stem_image(output_file, image)
    return {"image_file": output_file, "shape": list(image.shape), "pixel_size_A": list(image.pixel_size_A)}
