"""``automat.dft_check``: a Quantum ESPRESSO check of an (ML-relaxed) 2D structure.

The work chain runs one ``PwBaseWorkChain`` SCF (or, with ``relax=True``, a ``PwRelaxWorkChain`` relaxing the
positions and the in-plane cell) built with aiida-quantumespresso's ``get_builder_from_protocol`` plus our
settings (``aiida_automat/protocols/dft_check.yaml``: 2D Coulomb cut-off, cutoffs from the family's
recommendations). With ``compute_formation=True`` (default) it computes the formation energy with elemental
references computed with the same code, family, protocol and cutoffs — each reference once, cached as a ``Dict``
in a group and reused (:mod:`aiida_automat.workflows.dft_references`) — and compares with ML energies when
``ml_energies`` is given.

Energy scales: absolute total energies of QE (norm-conserving pseudopotentials) and of an ML potential or VASP
differ by arbitrary per-element offsets, so only *formation* energies are compared. CHGNet-like potentials
predict on the Materials Project 2020 corrected scale; for ``ml_energies['energy_scale'] == 'mp2020'`` the QE
formation energy is shifted by the MP2020 anion corrections before the difference is taken (both values are
reported).
"""

from __future__ import annotations

import copy
import functools
import pathlib
import warnings

import yaml
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction, if_
from aiida.plugins import WorkflowFactory

from . import dft_references as refs

PwBaseWorkChain = WorkflowFactory("quantumespresso.pw.base")
PwRelaxWorkChain = WorkflowFactory("quantumespresso.pw.relax")

PROTOCOL_FILE = pathlib.Path(__file__).resolve().parents[1] / "protocols" / "dft_check.yaml"
DEFAULT_FAMILY = "PseudoDojo/0.4/PBE/SR/standard/upf"
PW_PLUGIN = "quantumespresso.pw"

#: exit codes of this work chain: 34x critical input (nothing can be computed), 44x failed calculations.
EXIT_CODES = (
    (340, "ERROR_MISSING_CODE", "No usable `pw.x` code: {message}"),
    (341, "ERROR_MISSING_PSEUDO_FAMILY", "The pseudopotential family is not installed: {message}"),
    (342, "ERROR_MISSING_ELEMENT", "An element has no pseudopotential or no reference phase: {message}"),
    (343, "ERROR_INVALID_INPUT", "Invalid input: {message}"),
    (440, "ERROR_SCF_NOT_CONVERGED", "The SCF of the structure failed or did not converge: {message}"),
    (441, "ERROR_RELAX_FAILED", "The DFT relaxation of the structure failed: {message}"),
    (442, "ERROR_REFERENCE_FAILED", "An elemental reference calculation failed: {message}"),
)


# ------------------------------------------------------------------------------------------------ protocols


@functools.lru_cache(maxsize=1)
def _protocol_file() -> dict:
    return yaml.safe_load(PROTOCOL_FILE.read_text())


def recursive_merge(left: dict, right: dict) -> dict:
    """A new dict: ``right`` merged into ``left`` recursively (``right`` wins)."""
    merged = copy.deepcopy(left)
    for key, value in right.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = recursive_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def get_available_protocols() -> dict:
    """Protocol name → description."""
    return {name: spec.get("description", "") for name, spec in _protocol_file()["protocols"].items()}


def get_protocol_inputs(protocol: str | None = None) -> dict:
    """Our settings for ``protocol`` (defaults merged with the protocol's own entries)."""
    data = _protocol_file()
    protocol = protocol or data["default_protocol"]
    if protocol not in data["protocols"]:
        raise ValueError(f"unknown protocol `{protocol}`; choose one of {sorted(data['protocols'])}")
    specific = {k: v for k, v in data["protocols"][protocol].items() if k != "description"}
    return recursive_merge(data["default_inputs"], specific)


# ------------------------------------------------------------------------------------------- energy helpers


def mp2020_correction_per_atom(formula: str) -> float:
    """MP2020 (GGA) energy correction in eV/atom for a composition (anion corrections), NaN when MP2020 would
    need a GGA+U calculation (oxides/fluorides of Co, Cr, Fe, Mn, Mo, Ni, V, W) or rejects the composition."""
    from pymatgen.core import Composition
    from pymatgen.entries.compatibility import CompatibilityError, MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedEntry

    composition = Composition(formula)
    entry = ComputedEntry(composition, 0.0, parameters={"run_type": "GGA"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            adjustments = MaterialsProject2020Compatibility(check_potcar=False).get_adjustments(entry)
        except CompatibilityError:
            return float("nan")
    return sum(adjustment.value for adjustment in adjustments) / composition.num_atoms


@calcfunction
def extract_reference(parameters: orm.Dict, structure: orm.StructureData, settings: orm.Dict) -> orm.Dict:
    """The energy per atom of an elemental reference calculation, with the settings that identify it."""
    n_atoms = len(structure.sites)
    energy = parameters["energy"]
    result = dict(settings.get_dict())
    result.update(
        {
            "energy_eV": energy,
            "energy_per_atom_eV": energy / n_atoms,
            "n_atoms": n_atoms,
            "formula": structure.get_formula(),
            "total_magnetization": parameters.get_dict().get("total_magnetization"),
        }
    )
    return orm.Dict(result)


@calcfunction
def compare_energies(parameters: orm.Dict, structure: orm.StructureData, **inputs) -> orm.Dict:
    """DFT energy, formation energy (with the elemental references ``ref_<X>``) and differences to ``ml_energies``.

    Differences are ML minus DFT, in eV/atom.
    """
    import math

    from pymatgen.core import Composition

    energy = parameters["energy"]
    symbols = [site.kind_name for site in structure.sites]
    symbols = [structure.get_kind(name).symbol for name in symbols]
    n_atoms = len(symbols)
    result = {
        "formula": structure.get_formula(),
        "n_atoms": n_atoms,
        "energy_eV": energy,
        "energy_per_atom_eV": energy / n_atoms,
        "total_magnetization": parameters.get_dict().get("total_magnetization"),
        "units": "eV, eV/atom",
    }
    references = {key[4:]: node for key, node in inputs.items() if key.startswith("ref_")}
    if references:
        mu = {element: node["energy_per_atom_eV"] for element, node in references.items()}
        formation = (energy - sum(mu[symbol] for symbol in symbols)) / n_atoms
        formula = Composition("".join(symbols)).reduced_formula
        correction = mp2020_correction_per_atom(formula)
        result.update(
            {
                "reference_energies_per_atom_eV": mu,
                "reference_nodes": {element: node.uuid for element, node in references.items()},
                "formation_energy_per_atom_eV": formation,
                "mp2020_correction_per_atom_eV": None if math.isnan(correction) else correction,
                "formation_energy_per_atom_mp2020_eV": None if math.isnan(correction) else formation + correction,
            }
        )
    ml = inputs.get("ml_energies")
    if ml is not None:
        ml = ml.get_dict()
        result["ml"] = ml
        scale = ml.get("energy_scale", "mp2020")
        ml_formation = ml.get("formation_energy_per_atom")
        if ml_formation is not None and "formation_energy_per_atom_eV" in result:
            dft = result["formation_energy_per_atom_eV"]
            if scale == "mp2020":
                dft = result["formation_energy_per_atom_mp2020_eV"]
            result["dft_formation_energy_per_atom_on_ml_scale_eV"] = dft
            result["delta_formation_energy_per_atom_eV"] = None if dft is None else ml_formation - dft
            result["delta_formation_energy_eV"] = None if dft is None else (ml_formation - dft) * n_atoms
        if ml.get("energy_per_atom") is not None:
            # Absolute energies of different codes are on different scales: reported side by side, never subtracted.
            result["ml_energy_per_atom_eV"] = ml["energy_per_atom"]
            result["note"] = (
                "absolute ML and QE energies differ by pseudopotential offsets; compare formation energies"
            )
    return orm.Dict(result)


# ---------------------------------------------------------------------------------------------- work chain


class DftCheckWorkChain(WorkChain):
    """Check an (ML-relaxed) 2D structure with Quantum ESPRESSO: energy, formation energy, ML vs DFT."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input(
            "code",
            valid_type=orm.AbstractCode,
            required=False,
            help="A code for the `quantumespresso.pw` plugin (pw.x). Without it the work chain exits with 340.",
        )
        spec.input(
            "structure",
            valid_type=orm.StructureData,
            help="The structure to check; a 2D layer has pbc (True, True, False) with the vacuum along z.",
        )
        spec.input(
            "protocol",
            valid_type=orm.Str,
            default=lambda: orm.Str("balanced"),
            help="Protocol name (fast, balanced, stringent): aiida-quantumespresso's protocol plus "
            "`protocols/dft_check.yaml`.",
        )
        spec.input(
            "pseudo_family",
            valid_type=orm.Str,
            default=lambda: orm.Str(DEFAULT_FAMILY),
            help="Label of an installed aiida-pseudo family with recommended cutoffs (PseudoDojo or SSSP).",
        )
        spec.input(
            "overrides",
            valid_type=orm.Dict,
            required=False,
            help="Overrides for `PwBaseWorkChain.get_builder_from_protocol` (e.g. {'pw': {'parameters': {'SYSTEM': "
            "{'ecutwfc': 30, 'ecutrho': 120}}}, 'kpoints_distance': 0.5}); applied to the structure and to the "
            "elemental references alike, so that formation energies stay consistent.",
        )
        spec.input(
            "options",
            valid_type=orm.Dict,
            required=False,
            help="`metadata.options` for every pw.x calculation (resources, withmpi, max_wallclock_seconds, ...).",
        )
        spec.input(
            "relax",
            valid_type=orm.Bool,
            default=lambda: orm.Bool(False),
            help="Relax positions and the in-plane cell (PwRelaxWorkChain, cell_dofree 2Dxy) instead of one SCF.",
        )
        spec.input(
            "compute_formation",
            valid_type=orm.Bool,
            default=lambda: orm.Bool(True),
            help="Compute the formation energy with cached elemental references (computed when missing).",
        )
        spec.input(
            "ml_energies",
            valid_type=orm.Dict,
            required=False,
            help="ML energies to compare: `formation_energy_per_atom` and/or `energy_per_atom` (eV/atom), "
            "`energy_scale` ('mp2020' for CHGNet-like models, the default, or 'raw'), `model` (a name).",
        )
        spec.outline(
            cls.setup,
            cls.run_calculations,
            cls.inspect_calculations,
            if_(cls.should_compute_formation)(cls.collect_references),
            cls.results,
        )
        spec.output(
            "dft_check",
            valid_type=orm.Dict,
            help="DFT energy, formation energy, elemental references, ML values and ML−DFT differences (eV/atom).",
        )
        spec.output(
            "output_parameters", valid_type=orm.Dict, help="Parsed pw.x output of the structure's last calculation."
        )
        spec.output(
            "output_structure",
            valid_type=orm.StructureData,
            required=False,
            help="The DFT-relaxed structure (only with `relax=True`).",
        )
        for status, label, message in EXIT_CODES:
            spec.exit_code(status, label, message=message)

    # ----------------------------------------------------------------------------------------- builder

    @classmethod
    def get_protocol_inputs(cls, protocol: str | None = None) -> dict:
        return get_protocol_inputs(protocol)

    @classmethod
    def get_available_protocols(cls) -> dict:
        return get_available_protocols()

    @classmethod
    def get_builder_from_protocol(
        cls,
        code,
        structure,
        protocol: str = "fast",
        pseudo_family: str | None = None,
        ml_energies: orm.Dict | dict | None = None,
        overrides: dict | None = None,
        relax: bool = False,
        compute_formation: bool = True,
        options: dict | None = None,
    ):
        """A builder for this work chain.

        :param code: a ``quantumespresso.pw`` code (node or label).
        :param structure: ``StructureData`` (2D: pbc (True, True, False)).
        :param protocol: fast, balanced or stringent.
        :param pseudo_family: aiida-pseudo family label; default from the protocol (PseudoDojo 0.4 PBE SR standard).
        :param ml_energies: ML energies to compare (see the ``ml_energies`` input).
        :param overrides: overrides for ``PwBaseWorkChain.get_builder_from_protocol``.
        :param relax: relax positions and in-plane cell with DFT before reporting.
        :param compute_formation: compute the formation energy with elemental references.
        :param options: ``metadata.options`` for every pw.x calculation.
        """
        if isinstance(code, str):
            code = orm.load_code(code)
        inputs = get_protocol_inputs(protocol)
        builder = cls.get_builder()
        builder.code = code
        builder.structure = structure
        builder.protocol = orm.Str(protocol or _protocol_file()["default_protocol"])
        builder.pseudo_family = orm.Str(pseudo_family or inputs["pseudo_family"])
        if overrides:
            builder.overrides = orm.Dict(overrides)
        if options:
            builder.options = orm.Dict(options)
        if ml_energies is not None:
            builder.ml_energies = ml_energies if isinstance(ml_energies, orm.Dict) else orm.Dict(ml_energies)
        builder.relax = orm.Bool(relax)
        builder.compute_formation = orm.Bool(compute_formation)
        return builder

    # ------------------------------------------------------------------------------------------- steps

    def setup(self):
        """Check code, family, elements and cutoffs; find cached references."""
        from aiida_pseudo.groups.family import PseudoPotentialFamily

        from aiida_automat.errors import UnknownElement

        code = self.inputs.get("code")
        if code is None:
            return self.exit_codes.ERROR_MISSING_CODE.format(message="the `code` input is not set")
        plugin = code.default_calc_job_plugin
        if plugin is not None and plugin != PW_PLUGIN:
            return self.exit_codes.ERROR_MISSING_CODE.format(message=f"code `{code.full_label}` is for `{plugin}`")

        try:
            protocol_inputs = get_protocol_inputs(self.inputs.protocol.value)
        except ValueError as exception:
            return self.exit_codes.ERROR_INVALID_INPUT.format(message=str(exception))

        label = self.inputs.pseudo_family.value
        family = orm.QueryBuilder().append(PseudoPotentialFamily, filters={"label": label}).first(flat=True)
        if family is None:
            return self.exit_codes.ERROR_MISSING_PSEUDO_FAMILY.format(
                message=f"`{label}` (install it with `aiida-pseudo install ...`)"
            )

        structure = self.inputs.structure
        elements = sorted({kind.symbol for kind in structure.kinds})
        missing = [element for element in elements if element not in family.elements]
        if missing:
            return self.exit_codes.ERROR_MISSING_ELEMENT.format(message=f"{missing} not in family `{label}`")

        user = self.inputs.overrides.get_dict() if "overrides" in self.inputs else {}
        overrides = recursive_merge(protocol_inputs["pw_overrides"], user)
        overrides["pseudo_family"] = label
        system = overrides.setdefault("pw", {}).setdefault("parameters", {}).setdefault("SYSTEM", {})
        if "ecutwfc" not in system or "ecutrho" not in system:
            try:
                ecutwfc, ecutrho = family.get_recommended_cutoffs(
                    elements=tuple(elements), stringency=protocol_inputs["cutoff_stringency"], unit="Ry"
                )
            except (ValueError, AttributeError) as exception:
                return self.exit_codes.ERROR_INVALID_INPUT.format(
                    message=f"no recommended cutoffs from `{label}` ({exception}); set ecutwfc and ecutrho in overrides"
                )
            system.setdefault("ecutwfc", ecutwfc)
            system.setdefault("ecutrho", ecutrho)

        self.ctx.protocol_inputs = protocol_inputs
        self.ctx.overrides = overrides
        self.ctx.elements = elements
        self.ctx.family_label = label
        self.ctx.references = {}
        self.ctx.missing_references = []

        if self.inputs.compute_formation.value:
            self.ctx.group_label = refs.reference_group_label(code, label, self.inputs.protocol.value)
            self.ctx.settings_hash = refs.settings_hash(
                code, label, self.inputs.protocol.value, system["ecutwfc"], system["ecutrho"], overrides
            )
            for element in elements:
                try:
                    refs.reference_structure(element)
                except UnknownElement as exception:
                    return self.exit_codes.ERROR_MISSING_ELEMENT.format(message=str(exception))
                node = refs.find_reference(self.ctx.group_label, element, self.ctx.settings_hash)
                if node is None:
                    self.ctx.missing_references.append(element)
                else:
                    self.ctx.references[element] = node.uuid
            if self.ctx.references:
                self.report(f"reusing cached references for {sorted(self.ctx.references)}")
        self.report(
            f"ecutwfc={system['ecutwfc']} Ry, ecutrho={system['ecutrho']} Ry, family `{label}`, "
            f"protocol `{self.inputs.protocol.value}`"
        )

    def _spin_kwargs(self, structure: orm.StructureData, spin: bool) -> dict:
        from aiida_quantumespresso.common.types import SpinType

        return {"spin_type": SpinType.COLLINEAR} if spin else {}

    def _options(self) -> dict | None:
        return self.inputs.options.get_dict() if "options" in self.inputs else None

    def _base_builder(self, structure: orm.StructureData, overrides: dict, spin: bool):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # aiida-quantumespresso warns for every non-3D structure
            return PwBaseWorkChain.get_builder_from_protocol(
                self.inputs.code,
                structure,
                protocol=self.inputs.protocol.value,
                overrides=overrides,
                options=self._options(),
                **self._spin_kwargs(structure, spin),
            )

    def _structure_overrides(self) -> dict:
        overrides = self.ctx.overrides
        if tuple(self.inputs.structure.pbc) == (True, True, False):
            overrides = recursive_merge(self.ctx.protocol_inputs["two_dimensional"], overrides)
        return overrides

    def run_calculations(self):
        """Submit the structure's SCF (or relaxation) and the missing elemental references, all in parallel."""
        try:
            futures = self._submit_all()
        except ValueError as exception:  # raised by aiida-quantumespresso's builders for inconsistent inputs
            self.report(f"could not build the pw.x inputs: {exception}")
            return self.exit_codes.ERROR_INVALID_INPUT.format(message=str(exception))
        return ToContext(**futures)

    def _submit_all(self) -> dict:
        from aiida_quantumespresso.common.types import RelaxType

        structure = self.inputs.structure
        spin = any(kind.symbol in refs.MAGNETIC_ELEMENTS for kind in structure.kinds)
        futures = {}
        if self.inputs.relax.value:
            relax_settings = self.ctx.protocol_inputs["relax"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                builder = PwRelaxWorkChain.get_builder_from_protocol(
                    self.inputs.code,
                    structure,
                    protocol=self.inputs.protocol.value,
                    overrides={
                        "base_relax": self._structure_overrides(),
                        "base_init_relax": self._structure_overrides(),  # built by aiida-qe, dropped below
                        **relax_settings,
                    },
                    relax_type=RelaxType.POSITIONS_CELL,  # cell_dofree 2Dxy for pbc (True, True, False)
                    options=self._options(),
                    **self._spin_kwargs(structure, spin),
                )
            builder.pop("base_init_relax", None)
            builder.metadata.call_link_label = "relax"
            futures["relax"] = self.submit(builder)
            self.report(f"launched PwRelaxWorkChain<{futures['relax'].pk}> (positions + in-plane cell)")
        else:
            builder = self._base_builder(structure, self._structure_overrides(), spin)
            builder.metadata.call_link_label = "scf"
            futures["scf"] = self.submit(builder)
            self.report(f"launched PwBaseWorkChain<{futures['scf'].pk}> (SCF)")

        box = self.ctx.protocol_inputs["molecule_box_A"]
        for element in self.ctx.missing_references:
            phase = refs.reference_structure(element, box_A=box)
            ref_structure = orm.StructureData(ase=phase.atoms)
            overrides = copy.deepcopy(self.ctx.overrides)
            if phase.tot_magnetization is not None:
                overrides["pw"]["parameters"]["SYSTEM"]["tot_magnetization"] = phase.tot_magnetization
            builder = self._base_builder(ref_structure, overrides, phase.spin)
            if phase.is_molecule:
                kpoints = orm.KpointsData()
                kpoints.set_kpoints_mesh([1, 1, 1])
                builder.kpoints = kpoints
                builder.pop("kpoints_distance", None)
                builder.pw.settings = orm.Dict({"gamma_only": True})
            builder.metadata.call_link_label = f"reference_{element}"
            futures[f"reference_{element}"] = self.submit(builder)
            self.report(f"launched PwBaseWorkChain<{futures[f'reference_{element}'].pk}> for the {element} reference "
                        f"({phase.note}, {len(phase.atoms)} atoms)")
        return futures

    def inspect_calculations(self):
        """Check the structure's calculation and store new references in the cache group."""
        key = "relax" if self.inputs.relax.value else "scf"
        node = self.ctx[key]
        if not node.is_finished_ok:
            message = f"{node.process_label}<{node.pk}> exit status {node.exit_status}: {node.exit_message}"
            self.report(message)
            code = self.exit_codes.ERROR_RELAX_FAILED if key == "relax" else self.exit_codes.ERROR_SCF_NOT_CONVERGED
            return code.format(message=message)
        self.ctx.output_parameters = node.outputs.output_parameters
        self.ctx.final_structure = node.outputs.output_structure if key == "relax" else self.inputs.structure
        if key == "relax":
            self.out("output_structure", node.outputs.output_structure)
        self.out("output_parameters", node.outputs.output_parameters)

        for element in self.ctx.missing_references:
            ref = self.ctx[f"reference_{element}"]
            if not ref.is_finished_ok:
                message = f"{element}: PwBaseWorkChain<{ref.pk}> exit status {ref.exit_status}: {ref.exit_message}"
                self.report(message)
                return self.exit_codes.ERROR_REFERENCE_FAILED.format(message=message)
            phase = refs.reference_structure(element)
            settings = orm.Dict(
                {
                    "element": element,
                    "settings_hash": self.ctx.settings_hash,
                    "pseudo_family": self.ctx.family_label,
                    "protocol": self.inputs.protocol.value,
                    "code_uuid": self.inputs.code.uuid,
                    "code_label": self.inputs.code.full_label,
                    "ecutwfc": self.ctx.overrides["pw"]["parameters"]["SYSTEM"]["ecutwfc"],
                    "ecutrho": self.ctx.overrides["pw"]["parameters"]["SYSTEM"]["ecutrho"],
                    "phase": phase.note,
                    "kind": phase.kind,
                    "spin_polarised": phase.spin,
                    "table_version": refs.REFERENCE_TABLE_VERSION,
                }
            )
            result = extract_reference(
                ref.outputs.output_parameters,
                ref.inputs.pw.structure,
                settings,
                metadata={"call_link_label": f"extract_reference_{element}"},
            )
            refs.store_reference(self.ctx.group_label, result)
            self.ctx.references[element] = result.uuid

    def should_compute_formation(self):
        return self.inputs.compute_formation.value

    def collect_references(self):
        """Nothing to run: the references are all in ``ctx.references`` (cached or just computed)."""
        self.report(
            "elemental references: "
            + ", ".join(f"{el}={orm.load_node(uuid)['energy_per_atom_eV']:.4f} eV/atom"
                        for el, uuid in sorted(self.ctx.references.items()))
        )

    def results(self):
        inputs = AttributeDict()
        if self.inputs.compute_formation.value:
            for element, uuid in self.ctx.references.items():
                inputs[f"ref_{element}"] = orm.load_node(uuid)
        if "ml_energies" in self.inputs:
            inputs["ml_energies"] = self.inputs.ml_energies
        result = compare_energies(
            self.ctx.output_parameters,
            self.ctx.final_structure,
            **inputs,
            metadata={"call_link_label": "compare_energies"},
        )
        self.out("dft_check", result)
        formation = result.get_dict().get("formation_energy_per_atom_eV")
        if formation is not None:
            self.report(f"DFT formation energy {formation:.4f} eV/atom")
