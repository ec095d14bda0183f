"""``automat-exec relax``: 2D relaxation of a structure with an ML potential (no database needed).

Reads ``parameters.json``::

    {"structure": "structure.extxyz",
     "model": {"name": "chgnet", "version": "0.3.0", "sha256": "...", "path": "model_chgnet_....pth.tar"},
     "relax": {"optimizer": "FIRE", "fmax": 0.05, "steps": 400, "relax_cell": true, "fix_symmetry": false, ...},
     "device": "cpu", "num_threads": 1,
     "references": {"Mo": -10.7, "S": -4.1} | null}

writes ``relaxed.extxyz`` (final structure), ``trajectory.extxyz`` (every optimizer step with energy,
forces, stress) and returns energies, forces, stress, convergence and the model actually used (merged into
``status.json``). Non-convergence is *not* an error here: the outputs are written and ``converged`` is
false; the parser turns it into an exit code.
"""

from __future__ import annotations

import numpy as np

RELAXED_FILE = "relaxed.extxyz"
TRAJECTORY_FILE = "trajectory.extxyz"


def run(parameters: dict) -> dict:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    from ..energy.formation import formation_energy
    from ..energy.potentials import check_elements, load_potential
    from ..energy.relax import RelaxSettings, relax_2d

    model = parameters["model"]
    atoms = read(parameters.get("structure", "structure.extxyz"), format="extxyz")
    calculator, info = load_potential(
        model["name"],
        model.get("path"),
        device=parameters.get("device", "cpu"),
        num_threads=parameters.get("num_threads"),
        version=model.get("version"),
        expected_sha256=model.get("sha256"),
    )
    print(f"automat-exec relax: potential {info.label}", flush=True)
    check_elements(atoms, info)
    settings = RelaxSettings(**parameters.get("relax", {}))
    result = relax_2d(atoms, calculator, settings, strict=False, keep_trajectory=True)

    relaxed = result.atoms.copy()
    relaxed.pbc = (True, True, False)
    write(RELAXED_FILE, relaxed, format="extxyz")
    frames = []
    for frame in result.trajectory:
        copy = frame.copy()
        copy.pbc = (True, True, False)
        copy.calc = SinglePointCalculator(copy, **frame.calc.results)
        frames.append(copy)
    write(TRAJECTORY_FILE, frames or [relaxed], format="extxyz")

    out = result.summary()
    out["forces"] = np.asarray(result.forces).tolist()
    out["model"] = {k: v for k, v in info.as_dict().items() if k != "checkpoint_path"}
    references = parameters.get("references")
    if references:
        formation = formation_energy(relaxed, result.energy_per_atom, references)
        out["formation_energy_per_atom"] = formation.formation_energy_per_atom
        out["references"] = dict(formation.references)
    print(
        f"automat-exec relax: {out['formula']} E = {result.energy:.4f} eV, max force {result.max_force:.3f} eV/Å, "
        f"converged {result.converged} in {result.steps} steps",
        flush=True,
    )
    return out
