"""Formation energy per atom: E_form = E/atom − Σᵢ xᵢ μᵢ.

μᵢ must come from the same potential (or the same DFT setup) as E, on the same energy scale
(see ``references.py`` and ``scale.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..errors import UnknownElement


@dataclass(frozen=True)
class FormationEnergy:
    formation_energy_per_atom: float  # eV/atom
    energy_per_atom: float  # eV/atom of the compound
    fractions: tuple  # ((symbol, x), ...) sorted by symbol
    references: tuple  # ((symbol, μ eV/atom), ...) used

    def as_dict(self) -> dict:
        return {
            "formation_energy_per_atom": self.formation_energy_per_atom,
            "energy_per_atom": self.energy_per_atom,
            "fractions": dict(self.fractions),
            "references": dict(self.references),
        }


def composition(atoms_or_counts) -> dict:
    """{symbol: count} from ase.Atoms, a list of symbols or a mapping."""
    if hasattr(atoms_or_counts, "get_chemical_symbols"):
        return dict(Counter(atoms_or_counts.get_chemical_symbols()))
    if isinstance(atoms_or_counts, dict):
        return {str(k): float(v) for k, v in atoms_or_counts.items() if v}
    return dict(Counter(atoms_or_counts))


def formation_energy(atoms_or_counts, energy_per_atom: float, references: dict) -> FormationEnergy:
    """Formation energy per atom of a compound with ``energy_per_atom`` given references {symbol: μ}."""
    counts = composition(atoms_or_counts)
    total = float(sum(counts.values()))
    if total <= 0:
        raise ValueError("empty composition")
    missing = sorted(s for s in counts if s not in references)
    if missing:
        raise UnknownElement(f"no elemental reference for {', '.join(missing)}")
    fractions = tuple(sorted((s, n / total) for s, n in counts.items()))
    mus = tuple((s, float(references[s])) for s, _ in fractions)
    e_form = float(energy_per_atom) - sum(x * mu for (_, x), (_, mu) in zip(fractions, mus))
    return FormationEnergy(e_form, float(energy_per_atom), fractions, mus)
