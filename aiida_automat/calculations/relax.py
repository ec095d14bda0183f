"""``automat.relax``: 2D relaxation of a structure with an ML potential, run by ``automat-exec relax``.

The model is always an input node (``ModelCheckpointData``) — also for CHGNet, whose wheel checkpoint is
wrapped the same way — so the provenance graph names the exact weights (sha256) and the file is copied
to the remote working directory: offline cluster nodes need nothing but the package. Elemental references
(``references`` namespace: one cached Dict per element, see ``calculations/references.py``) are optional;
with them the formation energy is part of ``output_parameters``.
"""

from __future__ import annotations

import io

from aiida import orm

from ..data.model import ModelCheckpointData
from .base import AutomatCalcJob, dict_input

STRUCTURE_FILE = "structure.extxyz"
RELAXED_FILE = "relaxed.extxyz"
TRAJECTORY_FILE = "trajectory.extxyz"
MODEL_PREFIX = "model_"


def relax_settings(parameters: dict):
    """``RelaxSettings`` from a parameters dict: ``protocol`` plus overrides (raises ValueError)."""
    from ..energy.relax import protocol_settings

    parameters = dict(parameters)
    protocol = parameters.pop("protocol", None)
    return protocol_settings(protocol, **parameters)


def validate_parameters(node, _):
    if node is None:
        return None
    try:
        relax_settings(node.get_dict())
    except (ValueError, TypeError) as exc:
        return f"invalid relax parameters: {exc}"
    return None


def validate_device(value, _):
    if value is None:
        return None
    if not (value in ("cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())):
        return f"device must be cpu, cuda, cuda:N or mps, not {value!r}"
    return None


def validate_inputs(inputs, _):
    references = inputs.get("references") or {}
    if not references:
        return None
    model = inputs["model"]
    structure = inputs["structure"]
    elements = {structure.get_kind(site.kind_name).symbol for site in structure.sites}
    missing = sorted(elements - set(references))
    if missing:
        return f"references given but missing for {', '.join(missing)}"
    for symbol, node in references.items():
        sha = node.get("model_sha256")
        if sha != model.sha256:
            return f"reference of {symbol} was computed with model sha256 {sha}, not the input model {model.sha256}"
    return None


class RelaxCalculation(AutomatCalcJob):
    """Relax positions and the in-plane cell of a monolayer; energies, forces, stress, trajectory out."""

    _stage = "relax"
    _output_files = (RELAXED_FILE, TRAJECTORY_FILE)
    CACHE_VERSION = 1  # see AutomatCalcJob
    _default_parser = "automat.relax"

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("structure", valid_type=orm.StructureData, help="Monolayer, layer normal along the third cell vector.")
        spec.input("model", valid_type=ModelCheckpointData, help="The potential's checkpoint (MatterSim, CHGNet, SevenNet).")
        spec.input(
            "parameters",
            valid_type=orm.Dict,
            required=False,
            validator=validate_parameters,
            help="`protocol` (fast|moderate|precise) plus overrides: optimizer, fmax, steps, relax_cell, fix_symmetry, max_step.",
        )
        spec.input_namespace(
            "references",
            valid_type=orm.Dict,
            dynamic=True,
            required=False,
            help="Elemental references {symbol: Dict(energy_per_atom, model_sha256)} of the same model.",
        )
        spec.input("metadata.options.device", valid_type=str, default="cpu", validator=validate_device, help="cpu, cuda or cuda:N.")
        spec.input("metadata.options.num_threads", valid_type=int, default=1, help="torch CPU threads.")
        spec.inputs.validator = validate_inputs

        spec.output("relaxed_structure", valid_type=orm.StructureData, help="Relaxed structure, pbc (True, True, False).")
        spec.output("output_parameters", valid_type=orm.Dict, help="Energies, max force, stress, convergence, model used.")
        spec.output("forces", valid_type=orm.ArrayData, help="Final forces (eV/Å) and stress (Voigt, eV/Å³).")
        spec.output("trajectory", valid_type=orm.TrajectoryData, required=False, help="Every optimizer step.")
        spec.default_output_node = "output_parameters"

    def stage_parameters(self) -> dict:
        model = self.inputs.model
        settings = relax_settings(dict_input(self.inputs.get("parameters")))
        references = self.inputs.get("references") or {}
        return {
            "structure": STRUCTURE_FILE,
            "model": {**model.info(), "path": MODEL_PREFIX + model.filename},
            "relax": settings.as_dict(),
            "device": self.metadata.options.device,
            "num_threads": self.metadata.options.num_threads,
            "references": {s: float(node["energy_per_atom"]) for s, node in references.items()} or None,
        }

    def write_stage_inputs(self, folder) -> list:
        from ase.io import write

        atoms = self.inputs.structure.get_ase()
        buffer = io.StringIO()
        write(buffer, atoms, format="extxyz")
        with folder.open(STRUCTURE_FILE, "w", encoding="utf8") as handle:
            handle.write(buffer.getvalue())
        model = self.inputs.model
        return [(model.uuid, model.filename, MODEL_PREFIX + model.filename)]

    @classmethod
    def get_builder_from_protocol(
        cls,
        code,
        structure,
        *,
        model="auto",
        protocol: str = "moderate",
        overrides: dict | None = None,
        references: bool = True,
        device: str = "cpu",
    ):
        """Builder with the model resolved (``auto``: MatterSim when cached, else CHGNet) and, when
        ``references``, the model's cached elemental references (computed once per model if missing)."""
        from .references import get_elemental_references

        if not isinstance(model, ModelCheckpointData):
            model = ModelCheckpointData.get_or_create(model)
        builder = cls.get_builder()
        builder.code = code
        builder.structure = structure
        builder.model = model
        builder.parameters = orm.Dict({"protocol": protocol, **(overrides or {})})
        builder.metadata.options.device = device
        if references:
            elements = sorted({structure.get_kind(site.kind_name).symbol for site in structure.sites})
            builder.references = get_elemental_references(model, elements)
        return builder
