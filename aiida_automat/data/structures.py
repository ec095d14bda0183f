"""Structures crossing the core/AiiDA boundary, converted in one place.

The core works on ASE ``Atoms`` with the layer normal along z; a structure leaving as ``StructureData`` is
a 2D material and says so: pbc (True, True, False), which downstream codes (QE's ``assume_isolated``,
k-point meshes) rely on.
"""

from __future__ import annotations

import pathlib

import numpy as np

PBC_2D = (True, True, False)


def atoms_to_structure(atoms):
    from aiida import orm

    atoms = atoms.copy()
    atoms.pbc = PBC_2D
    return orm.StructureData(ase=atoms)


def structure_to_atoms(structure):
    atoms = structure.get_ase()
    atoms.pbc = PBC_2D if not all(structure.pbc) else atoms.pbc
    return atoms


def read_structure_file(path: str | pathlib.Path):
    """Any file ASE reads (extxyz, CIF, POSCAR, ...) as Atoms; a clear error when it is not a structure."""
    import ase.io

    from ..errors import AutomatError

    path = pathlib.Path(path)
    try:
        atoms = ase.io.read(path)
    except Exception as exc:  # noqa: BLE001 - ASE raises many types for unreadable files
        raise AutomatError(f"cannot read a structure from {path.name}: {exc}") from None
    if len(atoms) == 0:
        raise AutomatError(f"{path.name} contains no atoms")
    if not np.all(np.linalg.norm(atoms.cell[:2], axis=1) > 0):
        raise AutomatError(f"{path.name} has no in-plane cell: a 2D periodic structure is needed")
    return atoms
