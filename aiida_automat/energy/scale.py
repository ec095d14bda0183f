"""Energy scales: put DFT totals on the Materials Project 2020 corrected scale before comparing.

CHGNet and MatterSim are trained on Materials Project data and predict energies on the MP2020-corrected
scale (anion corrections, e.g. S ≈ −0.50 eV and O ≈ −0.69 eV per anion atom). Raw GGA energies such as
2DMatPedia's ``energy_per_atom`` are corrected here with pymatgen's ``MaterialsProject2020Compatibility``
(GGA entry, no +U). The elemental references need no correction (MP2020 corrects compounds only).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from ..errors import AutomatError


@dataclass(frozen=True)
class CorrectedEnergy:
    energy_per_atom: float  # raw, eV/atom
    corrected_energy_per_atom: float  # MP2020 scale, eV/atom
    correction_per_atom: float  # corrected − raw
    adjustments: tuple  # ((name, total eV), ...)


def mp2020_correct(atoms, energy_per_atom: float, *, run_type: str = "GGA") -> CorrectedEnergy:
    """MP2020-corrected energy per atom of a raw GGA total for the structure ``atoms`` (ase.Atoms).

    Raises ``AutomatError`` when the compatibility scheme rejects the entry (e.g. a composition that MP
    would only accept as GGA+U).
    """
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(_periodic(atoms))
    entry = ComputedStructureEntry(
        structure,
        float(energy_per_atom) * len(structure),
        parameters={"run_type": run_type, "is_hubbard": False, "hubbards": {}},
    )
    processed = MaterialsProject2020Compatibility(check_potcar=False).process_entry(entry)
    if processed is None:
        raise AutomatError(f"MP2020 compatibility rejected {structure.composition.reduced_formula} as a {run_type} entry")
    adjustments = tuple((adj.name, float(adj.value)) for adj in processed.energy_adjustments)
    corrected = float(processed.energy_per_atom)
    return CorrectedEnergy(float(energy_per_atom), corrected, corrected - float(energy_per_atom), adjustments)


def _periodic(atoms):
    work = atoms.copy()
    work.pbc = True
    return work


def load_mp_references(path: str | pathlib.Path) -> dict:
    """{symbol: μ (eV/atom)} from ``mp_elemental_references.json`` (uncorrected GGA ground states)."""
    with open(path, encoding="utf8") as handle:
        data = json.load(handle)
    energies = data.get("energies", data)
    return {symbol: float(row["energy_per_atom"] if isinstance(row, dict) else row) for symbol, row in energies.items()}
