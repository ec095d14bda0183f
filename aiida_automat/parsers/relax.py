"""Parser of ``automat.relax``: relaxed structure, energies, forces, trajectory; exit codes for failures.

Failures reported by the executable (unsupported element → 322, NaN energies or missing/corrupt model →
410, ...) come from ``status.json`` via ``AutomatParser``. A relaxation that ran out of steps still
attaches every output and then returns ``ERROR_NOT_CONVERGED`` (411), so a workflow can restart from
``relaxed_structure``.
"""

from __future__ import annotations

import io
import math

import numpy as np
from aiida import orm

from ..calculations.relax import RELAXED_FILE, TRAJECTORY_FILE
from .base import AutomatParser


class RelaxParser(AutomatParser):
    def parse_outputs(self, retrieved, status: dict):
        from ase.io import read

        names = retrieved.base.repository.list_object_names()
        if RELAXED_FILE not in names:
            return self.exit_codes.ERROR_OUTPUT_MISSING
        try:
            relaxed = read(io.StringIO(self.read_text(retrieved, RELAXED_FILE)), format="extxyz")
            frames = (
                read(io.StringIO(self.read_text(retrieved, TRAJECTORY_FILE)), index=":", format="extxyz")
                if TRAJECTORY_FILE in names
                else []
            )
        except Exception as exc:  # noqa: BLE001 - any reader error means a corrupt file
            self.logger.error(f"could not read the relaxation output: {exc}")
            return self.exit_codes.ERROR_OUTPUT_CORRUPT

        energy = status.get("energy")
        if energy is None or not math.isfinite(float(energy)):
            return self.exit_codes.ERROR_POTENTIAL.format(message="the energy in status.json is missing or not finite")
        model = status.get("model", {})
        if model.get("sha256") and model["sha256"] != self.node.inputs.model.sha256:
            return self.exit_codes.ERROR_POTENTIAL.format(message="the executable used a model with another sha256")

        relaxed.pbc = (True, True, False)
        structure = orm.StructureData(ase=relaxed)
        structure.pbc = (True, True, False)
        self.out("relaxed_structure", structure)

        forces = orm.ArrayData()
        forces.set_array("forces", np.asarray(status.get("forces", []), dtype=float).reshape(-1, 3))
        if status.get("stress") is not None:
            forces.set_array("stress", np.asarray(status["stress"], dtype=float))
        self.out("forces", forces)

        if frames:
            self.out("trajectory", _trajectory(frames))

        keys = (
            "energy", "energy_per_atom", "initial_energy", "max_force", "stress", "converged", "steps", "natoms",
            "formula", "a", "b", "in_plane_area", "settings", "model", "formation_energy_per_atom", "references",
            "wall_time_s",
        )
        parameters = {k: status[k] for k in keys if k in status}
        parameters["energy_units"] = "eV"
        parameters["stress_units"] = "eV/Å^3 (Voigt, ASE sign, periodic cell incl. vacuum)"
        self.out("output_parameters", orm.Dict(parameters))

        if not status.get("converged", False):
            settings = status.get("settings", {})
            return self.exit_codes.ERROR_NOT_CONVERGED.format(
                message=f"max force {status.get('max_force', float('nan')):.3f} eV/Å after {status.get('steps')} steps "
                f"(fmax {settings.get('fmax')})"
            )
        return None


def _trajectory(frames) -> orm.TrajectoryData:
    trajectory = orm.TrajectoryData()
    symbols = frames[0].get_chemical_symbols()
    trajectory.set_trajectory(
        symbols=symbols,
        positions=np.array([f.get_positions() for f in frames]),
        cells=np.array([np.asarray(f.cell) for f in frames]),
        stepids=np.arange(len(frames)),
        pbc=(True, True, False),
    )
    energies, forces = [], []
    for frame in frames:
        results = frame.calc.results if frame.calc is not None else {}
        energies.append(results.get("energy", np.nan))
        forces.append(results.get("forces", np.full((len(frame), 3), np.nan)))
    trajectory.set_array("energy", np.asarray(energies, dtype=float))
    trajectory.set_array("forces", np.asarray(forces, dtype=float))
    return trajectory
