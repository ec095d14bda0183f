"""Elemental reference states μᵢ for formation energies, computed with the same potential.

Choice (documented in docs/benchmarks.md): the reference of an element is the **lowest relaxed energy
per atom over a small set of candidate ground-state structures**, mimicking the Materials Project
ground states that the DFT references (``mp_elemental_references.json``) and the potentials' training
data use.

* Metals (default): fcc, bcc and hcp, fully relaxed (positions + cell); the lowest wins.
* Covalent solids written out from crystallography (fully relaxed): diamond (C, Si, Ge, α-Sn) and graphite
  (C); α-rhombohedral B₁₂; black phosphorus; trigonal chain Se and Te; A7 As, Sb, Bi; α-Ga; tetragonal In;
  β-Sn; rhombohedral Hg.
* Molecular elements H, N, O, F, Cl, Br, I: the diatomic molecule in a 12 Å box (positions relaxed). The
  MP ground states are molecular crystals whose GGA binding per atom is small (tens of meV); the box
  removes the risk of an ML potential inventing dense phases.
* Sulfur: the S₈ crown ring in a 12 Å box (α-S is a crystal of S₈ rings).
* Noble gases: fcc at the experimental volume, relaxed.

Known limitations: α-Mn (58 atoms) and the other complex metal ground states are approximated by the best
of fcc/bcc/hcp; halogen molecular crystals by the free molecule. ``compare_references`` quantifies the
difference against the DFT references for any potential.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import PotentialError, UnknownElement
from .relax import RelaxSettings, relax_bulk, relax_fixed_cell

MOLECULES = {"H": 0.74, "N": 1.10, "O": 1.21, "F": 1.42, "Cl": 1.99, "Br": 2.28, "I": 2.67}
NOBLE = ("He", "Ne", "Ar", "Kr", "Xe", "Rn")
BOX = 12.0
REFERENCE_SETTINGS = RelaxSettings(optimizer="FIRE", fmax=0.02, steps=500, relax_cell=True)


@dataclass(frozen=True)
class ReferenceEnergy:
    symbol: str
    energy_per_atom: float  # eV/atom, the chosen (lowest) candidate
    label: str  # which candidate
    converged: bool
    candidates: tuple = ()  # ((label, energy_per_atom or None, converged), ...)
    atoms: object = field(default=None, repr=False, compare=False)  # relaxed ase.Atoms of the winner

    def as_dict(self) -> dict:
        return {
            "element": self.symbol,
            "energy_per_atom": self.energy_per_atom,
            "structure": self.label,
            "converged": self.converged,
            "candidates": [list(c) for c in self.candidates],
        }


def _symbol(symbol: str) -> str:
    from ase.data import atomic_numbers

    if symbol not in atomic_numbers or symbol == "X":
        raise UnknownElement(f"{symbol!r} is not a chemical element")
    return symbol


def nearest_neighbour_estimate(symbol: str) -> float:
    """Nearest-neighbour distance (Å) from ASE's reference state, else twice the covalent radius."""
    from ase.data import atomic_numbers, covalent_radii, reference_states

    z = atomic_numbers[symbol]
    ref = reference_states[z] or {}
    sym, a = ref.get("symmetry"), ref.get("a")
    if a:
        if sym == "fcc":
            return a / math.sqrt(2)
        if sym == "bcc":
            return a * math.sqrt(3) / 2
        if sym == "hcp":
            return a
        if sym == "diamond":
            return a * math.sqrt(3) / 4
    return 2 * float(covalent_radii[z])


def _fcc(symbol, d):
    from ase.build import bulk

    return bulk(symbol, "fcc", a=d * math.sqrt(2))


def _bcc(symbol, d):
    from ase.build import bulk

    return bulk(symbol, "bcc", a=2 * d / math.sqrt(3))


def _hcp(symbol, d):
    from ase.build import bulk

    return bulk(symbol, "hcp", a=d, c=d * math.sqrt(8 / 3))


def _diamond(symbol, d):
    from ase.build import bulk

    return bulk(symbol, "diamond", a=4 * d / math.sqrt(3))


def _crystal(symbol, spacegroup, basis, cellpar, **kwargs):
    from ase.spacegroup import crystal

    return crystal([symbol] * len(basis), basis, spacegroup=spacegroup, cellpar=cellpar, primitive_cell=True, **kwargs)


def _dimer(symbol, bond):
    from ase import Atoms

    return Atoms([symbol, symbol], positions=[[0, 0, 0], [0, 0, bond]], cell=[BOX, BOX, BOX + 0.37], pbc=True)


def _s8_ring():
    """S₈ crown (D4d): S–S 2.05 Å, S–S–S 108°, alternating heights ±0.49 Å; in a box."""
    from ase import Atoms

    bond, angle = 2.05, math.radians(108.0)
    second = 2 * bond * math.sin(angle / 2)  # 1–3 distance, same height
    radius = second / math.sqrt(2)
    chord = 2 * radius * math.sin(math.pi / 8)
    height = 0.5 * math.sqrt(max(bond**2 - chord**2, 0.0))
    positions = [
        [radius * math.cos(k * math.pi / 4), radius * math.sin(k * math.pi / 4), height * (-1) ** k] for k in range(8)
    ]
    atoms = Atoms("S8", positions=positions, cell=[BOX, BOX + 0.41, BOX + 0.83], pbc=True)
    atoms.center()
    return atoms


def _rhombohedral_hg():
    from ase import Atoms
    from ase.lattice import RHL

    return Atoms("Hg", cell=RHL(2.99, 70.45).tocell(), pbc=True)


#: element → {label: builder()} written out from crystallographic data (room-temperature/low-T phases)
SPECIAL = {
    "B": {"alpha-B12": lambda: _crystal("B", 166, [(0.11886, 0.88114, 0.89133), (0.19686, 0.80314, 0.02432)], [4.908, 4.908, 12.567, 90, 90, 120])},
    "C": {
        "graphite": lambda: _crystal("C", 194, [(0, 0, 0.25), (1 / 3, 2 / 3, 0.25)], [2.464, 2.464, 6.711, 90, 90, 120]),
        "diamond": lambda: _diamond("C", 1.545),
    },
    "Si": {"diamond": lambda: _diamond("Si", 2.352)},
    "Ge": {"diamond": lambda: _diamond("Ge", 2.450)},
    "P": {"black-P": lambda: _crystal("P", 64, [(0, 0.10168, 0.08056)], [3.314, 10.478, 4.376, 90, 90, 90])},
    "Se": {"trigonal": lambda: _crystal("Se", 152, [(0.2254, 0, 1 / 3)], [4.366, 4.366, 4.954, 90, 90, 120])},
    "Te": {"trigonal": lambda: _crystal("Te", 152, [(0.2633, 0, 1 / 3)], [4.457, 4.457, 5.929, 90, 90, 120])},
    "As": {"A7": lambda: _crystal("As", 166, [(0, 0, 0.22727)], [3.7598, 3.7598, 10.5475, 90, 90, 120])},
    "Sb": {"A7": lambda: _crystal("Sb", 166, [(0, 0, 0.23349)], [4.3084, 4.3084, 11.274, 90, 90, 120])},
    "Bi": {"A7": lambda: _crystal("Bi", 166, [(0, 0, 0.23389)], [4.5461, 4.5461, 11.862, 90, 90, 120])},
    "Ga": {
        "alpha-Ga": lambda: _crystal("Ga", 64, [(0, 0.1549, 0.0810)], [4.5197, 7.6633, 4.5260, 90, 90, 90]),
        "fcc": lambda: _fcc("Ga", 2.80),
    },
    "In": {"tetragonal": lambda: _crystal("In", 139, [(0, 0, 0)], [3.2523, 3.2523, 4.9461, 90, 90, 90])},
    "Sn": {
        "alpha-Sn": lambda: _diamond("Sn", 2.810),
        "beta-Sn": lambda: _crystal("Sn", 141, [(0, 0, 0)], [5.8318, 5.8318, 3.1818, 90, 90, 90]),
    },
    "Hg": {"rhombohedral": _rhombohedral_hg},
    "S": {"S8-ring": _s8_ring},
}


def reference_candidates(symbol: str) -> dict:
    """Candidate ground-state structures {label: ase.Atoms} for an element (see the module docstring)."""
    symbol = _symbol(symbol)
    if symbol in MOLECULES:
        return {"dimer-in-box": _dimer(symbol, MOLECULES[symbol])}
    if symbol in SPECIAL:
        return {label: build() for label, build in SPECIAL[symbol].items()}
    d = nearest_neighbour_estimate(symbol)
    if symbol in NOBLE:
        return {"fcc": _fcc(symbol, d)}
    return {"fcc": _fcc(symbol, d), "bcc": _bcc(symbol, d), "hcp": _hcp(symbol, d)}


def is_molecular(label: str) -> bool:
    return label in ("dimer-in-box", "S8-ring")


def _sane(atoms, symbol: str) -> bool:
    """Reject a relaxed candidate that collapsed (atoms closer than 60 % of a covalent bond)."""
    from ase.data import atomic_numbers, covalent_radii

    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, cutoff=4.0)
    return not (len(d) and d.min() < 0.6 * 2 * covalent_radii[atomic_numbers[symbol]])


def compute_reference(symbol: str, calculator, settings: RelaxSettings = REFERENCE_SETTINGS) -> ReferenceEnergy:
    """Relax every candidate of ``symbol`` with ``calculator``; return the lowest energy per atom."""
    rows, best = [], None
    errors = []
    for label, atoms in reference_candidates(symbol).items():
        try:
            if is_molecular(label):
                result = relax_fixed_cell(atoms, calculator, settings)
            else:
                result = relax_bulk(atoms, calculator, settings)
        except PotentialError as exc:
            errors.append(f"{label}: {exc}")
            rows.append((label, None, False))
            continue
        if not _sane(result.atoms, symbol):
            errors.append(f"{label}: collapsed during relaxation")
            rows.append((label, None, False))
            continue
        rows.append((label, result.energy_per_atom, result.converged))
        if best is None or result.energy_per_atom < best[1].energy_per_atom:
            best = (label, result)
    if best is None:
        raise PotentialError(f"no reference structure of {symbol} could be evaluated: {'; '.join(errors)}")
    label, result = best
    return ReferenceEnergy(symbol, float(result.energy_per_atom), label, result.converged, tuple(rows), result.atoms)


def compute_references(symbols, calculator, settings: RelaxSettings = REFERENCE_SETTINGS) -> dict:
    """{symbol: ReferenceEnergy} for every distinct element in ``symbols``."""
    return {s: compute_reference(s, calculator, settings) for s in sorted(set(symbols))}


def compare_references(computed: dict, dft: dict) -> dict:
    """{symbol: computed μ − DFT μ} in eV/atom, for the elements present in both."""
    out = {}
    for symbol, ref in computed.items():
        value = ref.energy_per_atom if isinstance(ref, ReferenceEnergy) else float(ref)
        if symbol in dft:
            out[symbol] = value - float(dft[symbol])
    return out


def as_mu(references: dict) -> dict:
    """{symbol: μ (eV/atom)} from ReferenceEnergy objects or plain numbers."""
    return {s: (r.energy_per_atom if isinstance(r, ReferenceEnergy) else float(r)) for s, r in references.items()}
