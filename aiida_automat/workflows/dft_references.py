"""Elemental reference phases for DFT formation energies, and their cache in the AiiDA database.

A formation energy ``E_f = (E - sum_i n_i mu_i) / N`` is only meaningful when the elemental chemical potentials
``mu_i`` come from the *same* code, pseudopotential family, protocol and plane-wave cutoffs as the compound: total
energies of a pseudopotential code carry an arbitrary per-element offset that cancels only then. This module

* defines one reference structure per element (:func:`reference_structure`) — ASE bulk ground states for solids
  (at ASE's experimental lattice constants), explicit crystal structures where ASE has none, and a molecule in a
  box for gases and molecular solids — see :data:`REFERENCE_TABLE_NOTES`;
* caches computed references as ``Dict`` nodes in a ``Group`` labelled by code, family and protocol
  (:func:`reference_group_label`); within the group, a reference is found by element and by a hash of every
  setting that changes its energy (:func:`settings_hash`: cutoffs, overrides, table version), so a second request
  with the same settings reuses it and a request with other cutoffs computes a new one;
* installs a pseudopotential family from an ``aiida-pseudo`` archive (:func:`install_pseudo_family`).

Nothing here runs a calculation; :mod:`aiida_automat.workflows.dft_check` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib

#: bump when a reference structure changes: old cached references then no longer match.
REFERENCE_TABLE_VERSION = 1

#: group label prefix of the reference cache.
GROUP_PREFIX = "automat/dft_references"

#: elements computed spin-polarised (collinear, ferromagnetic start), in compounds and as references.
MAGNETIC_ELEMENTS = frozenset(
    "V Cr Mn Fe Co Ni Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb".split()
)

#: bond lengths (Å) of diatomic references (experimental, NIST CCCBDB).
DIATOMIC_BOND_A = {"H": 0.741, "N": 1.098, "O": 1.208, "F": 1.412, "Cl": 1.988, "Br": 2.281, "I": 2.666}

#: total magnetisation (Bohr magnetons) of molecular references with an open shell.
MOLECULE_MAGNETISATION = {"O": 2.0}

REFERENCE_TABLE_NOTES = """\
Reference phases (one per element, computed at fixed geometry with SCF):

* gases H, N, O, F and the molecular solids Cl, Br, I: the diatomic molecule in a box (Γ point only;
  O2 as a triplet). For Cl, Br, I this neglects the weak intermolecular binding of the solid (PBE: tens of meV/atom).
* He: the isolated atom in a box.
* S: the S8 crown molecule in a box (α-S is a molecular crystal of S8 rings bound by dispersion that PBE barely
  describes; the 128-atom crystal is out of reach of a quick check).
* C: AB graphite (a = 2.464, c = 6.711 Å); B: α-rhombohedral B12; P: black phosphorus (Cmce);
  Se, Te: trigonal chains (P3_121); Ga: α-Ga (Cmce) — experimental structures.
* Mn: fcc, a = 3.52 Å, spin-polarised — an approximation of the 58-atom α-Mn ground state.
* all others: ``ase.build.bulk(symbol)`` (ASE's reference state, experimental lattice constant).
* elements in MAGNETIC_ELEMENTS are spin-polarised (ferromagnetic start; AFM ground states such as Cr are
  approximated).
"""


@dataclasses.dataclass(frozen=True)
class ReferencePhase:
    """An elemental reference structure and how to compute it."""

    symbol: str
    atoms: object  # ase.Atoms, fully periodic
    kind: str  # 'bulk', 'molecule' or 'atom'
    spin: bool
    tot_magnetization: float | None = None
    note: str = ""

    @property
    def is_molecule(self) -> bool:
        return self.kind in ("molecule", "atom")


def _s8_crown():
    """S8 crown ring (D4d): bond 2.055 Å, bond angle 108°."""
    from ase import Atoms

    bond, angle = 2.055, math.radians(108.0)
    d13 = math.sqrt(2 * bond**2 * (1 - math.cos(angle)))
    radius = d13 / math.sqrt(2)
    height = math.sqrt(bond**2 - (2 * radius * math.sin(math.pi / 8)) ** 2)
    positions = [
        (radius * math.cos(k * math.pi / 4), radius * math.sin(k * math.pi / 4), (height / 2) * (-1) ** k)
        for k in range(8)
    ]
    return Atoms("S8", positions=positions)


def _crystal(symbol, basis, spacegroup, cellpar):
    from ase.spacegroup import crystal

    return crystal(
        [symbol] * len(basis), basis=basis, spacegroup=spacegroup, cellpar=cellpar, primitive_cell=True
    )


def _boxed(atoms, box_A: float):
    """Put a molecule in an orthorhombic box (slightly anisotropic, so no accidental degeneracies)."""
    atoms = atoms.copy()
    atoms.set_cell([box_A, box_A + 0.5, box_A + 1.0])
    atoms.center()
    atoms.pbc = True
    return atoms


def reference_structure(symbol: str, box_A: float = 10.0) -> ReferencePhase:
    """The reference phase of one element; ``box_A`` is the box edge for molecules and atoms.

    :raises aiida_automat.errors.UnknownElement: when the element has no reference phase.
    """
    from ase import Atoms
    from ase.build import bulk
    from ase.data import chemical_symbols

    from aiida_automat.errors import UnknownElement

    if symbol not in chemical_symbols[1:]:
        raise UnknownElement(f"`{symbol}` is not a chemical element")
    spin = symbol in MAGNETIC_ELEMENTS

    if symbol in DIATOMIC_BOND_A:
        molecule = Atoms(f"{symbol}2", positions=[(0, 0, 0), (0, 0, DIATOMIC_BOND_A[symbol])])
        magnetisation = MOLECULE_MAGNETISATION.get(symbol)
        return ReferencePhase(
            symbol, _boxed(molecule, box_A), "molecule", magnetisation is not None, magnetisation, "diatomic molecule"
        )
    if symbol == "He":
        return ReferencePhase(symbol, _boxed(Atoms("He", positions=[(0, 0, 0)]), box_A), "atom", False, None, "atom")
    if symbol == "S":
        return ReferencePhase(symbol, _boxed(_s8_crown(), box_A + 2.0), "molecule", False, None, "S8 crown molecule")

    special = {
        "C": lambda: _crystal("C", [(0, 0, 0.25), (1 / 3, 2 / 3, 0.25)], 194, [2.464, 2.464, 6.711, 90, 90, 120]),
        "B": lambda: _crystal(
            "B", [(0.1187, 0.8813, 0.8911), (0.1965, 0.8035, 0.0243)], 166, [4.908, 4.908, 12.567, 90, 90, 120]
        ),
        "P": lambda: _crystal("P", [(0, 0.10168, 0.08056)], 64, [3.3136, 10.478, 4.3763, 90, 90, 90]),
        "Se": lambda: _crystal("Se", [(0.2254, 0, 1 / 3)], 152, [4.366, 4.366, 4.954, 90, 90, 120]),
        "Te": lambda: _crystal("Te", [(0.2636, 0, 1 / 3)], 152, [4.457, 4.457, 5.929, 90, 90, 120]),
        "Ga": lambda: _crystal("Ga", [(0, 0.1549, 0.0810)], 64, [4.5192, 7.6586, 4.5258, 90, 90, 90]),
        "Mn": lambda: bulk("Mn", "fcc", a=3.52),
    }
    notes = {
        "C": "AB graphite",
        "B": "alpha-B12",
        "P": "black phosphorus",
        "Se": "trigonal",
        "Te": "trigonal",
        "Ga": "alpha-Ga",
        "Mn": "fcc (approximation of alpha-Mn)",
    }
    if symbol in special:
        return ReferencePhase(symbol, special[symbol](), "bulk", spin, None, notes[symbol])
    try:
        atoms = bulk(symbol)
    except Exception as exception:  # ASE has no reference state (e.g. Pm) or cannot build it
        raise UnknownElement(f"no elemental reference structure for `{symbol}`: {exception}") from exception
    return ReferencePhase(symbol, atoms, "bulk", spin, None, "ase.build.bulk")


# ---------------------------------------------------------------------------------------------------- the cache


def reference_group_label(code, pseudo_family: str, protocol: str) -> str:
    """Label of the group that caches the references of one code + family + protocol."""
    return f"{GROUP_PREFIX}/{pseudo_family}/{protocol}/{code.full_label}"


def settings_hash(code, pseudo_family: str, protocol: str, ecutwfc: float, ecutrho: float, overrides: dict) -> str:
    """A hash of every setting that changes a reference energy (code uuid, family, protocol, cutoffs, overrides)."""
    payload = {
        "code": code.uuid,
        "family": pseudo_family,
        "protocol": protocol,
        "ecutwfc": round(float(ecutwfc), 4),
        "ecutrho": round(float(ecutrho), 4),
        "overrides": overrides or {},
        "table": REFERENCE_TABLE_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_reference(group_label: str, element: str, hash_: str):
    """The cached reference ``Dict`` of ``element`` with settings ``hash_``, or ``None`` (oldest match wins)."""
    from aiida import orm

    query = orm.QueryBuilder()
    query.append(orm.Group, filters={"label": group_label}, tag="group")
    query.append(
        orm.Dict,
        with_group="group",
        filters={"attributes.element": element, "attributes.settings_hash": hash_},
        project="*",
    )
    query.order_by({orm.Dict: {"ctime": "asc"}})
    query.limit(1)
    found = query.all(flat=True)
    return found[0] if found else None


def store_reference(group_label: str, node) -> None:
    """Add a reference ``Dict`` to the cache group (created on first use)."""
    from aiida import orm

    group, _ = orm.Group.collection.get_or_create(label=group_label)
    group.add_nodes([node])


# ---------------------------------------------------------------------------------------------- pseudo family


def install_pseudo_family(archive: str | pathlib.Path, default_stringency: str = "normal"):
    """Install a PseudoDojo family from an ``aiida-pseudo`` archive (``aiida-pseudo install pseudo-dojo
    --download-only`` writes one) into the loaded profile, or return it when it is already installed.

    Same as ``aiida-pseudo install pseudo-dojo --from-download ARCHIVE``, callable from Python (tests, CLI).
    """
    import tarfile
    import tempfile

    from aiida import orm
    from aiida_pseudo.cli.install import install_pseudo_dojo
    from aiida_pseudo.data.pseudo import JthXmlData, PsmlData, Psp8Data, UpfData
    from aiida_pseudo.groups.family.pseudo_dojo import PseudoDojoConfiguration, PseudoDojoFamily

    archive = pathlib.Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"pseudopotential archive not found: {archive}")
    types = {"jthxml": JthXmlData, "psp8": Psp8Data, "psml": PsmlData, "upf": UpfData}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        with tarfile.open(archive, "r") as handle:
            handle.extractall(tmp, filter="data")
        configuration = PseudoDojoConfiguration(**json.loads((tmp / "configuration.json").read_text()))
        label = PseudoDojoFamily.format_configuration_label(configuration)
        existing = orm.QueryBuilder().append(PseudoDojoFamily, filters={"label": label}).first(flat=True)
        if existing is not None:
            return existing
        family = install_pseudo_dojo(
            configuration,
            tmp / "archive.tgz",
            tmp / "metadata.tgz",
            types[configuration.pseudo_format],
            label,
            f"{configuration} installed by aiida-automat from {archive.name}",
            False,
        )
    family.set_default_stringency(default_stringency)
    return family
