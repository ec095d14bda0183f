"""Structure helpers for image simulation: reading, 2D checks, in-plane strain, orthogonal supercells.

Everything here works on ASE ``Atoms`` with the layer normal along z, the convention of the whole core.
The simulators need two things that ASE does not give directly: a check that a structure really is a
2D layer (so a bulk cell fails with a clear message instead of a nonsense image), and an orthogonal
supercell plus the exact affine map back to the original frame, because abTEM needs an orthogonal box
while our Fourier-series resampling needs the *true* periodicity.
"""

from __future__ import annotations

import itertools
import pathlib
from dataclasses import dataclass

import numpy as np

from ..errors import SimulationError, UnknownElement

__all__ = [
    "OrthogonalCell",
    "apply_strain_2d",
    "orthogonal_cell",
    "read_structures",
    "strain_matrix",
    "to_atoms",
    "validate_layer",
]


def read_structures(path, index=":") -> list:
    """Read extxyz / CIF / anything ASE reads into a list of ``Atoms``."""
    from ase.io import read

    path = pathlib.Path(path)
    if not path.exists():
        raise SimulationError(f"structure file {path} does not exist")
    try:
        result = read(str(path), index=index)
    except Exception as exc:  # ASE raises many types; callers only need one
        raise SimulationError(f"cannot read structures from {path}: {exc}") from exc
    return list(result) if isinstance(result, list) else [result]


def to_atoms(structure):
    """Accept ASE ``Atoms`` or a pymatgen ``Structure`` (the two types other modules hand us)."""
    from ase import Atoms

    if isinstance(structure, Atoms):
        return structure.copy()
    if type(structure).__name__ in ("Structure", "IStructure") and hasattr(structure, "lattice"):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_atoms(structure)
    raise SimulationError(f"expected ase.Atoms or pymatgen Structure, got {type(structure).__name__}")


def validate_layer(atoms) -> None:
    """Reject structures that are not a 2D layer with in-plane cell vectors a, b and normal along z."""
    from ase.data import atomic_numbers

    if len(atoms) == 0:
        raise SimulationError("structure has no atoms")
    for symbol in set(atoms.get_chemical_symbols()):
        if symbol not in atomic_numbers or atomic_numbers[symbol] == 0:
            raise UnknownElement(f"unknown element {symbol!r} in structure")
    cell = np.asarray(atoms.cell[:], dtype=float)
    if cell.shape != (3, 3):
        raise SimulationError("structure has no 3D cell")
    a, b = cell[0], cell[1]
    if abs(a[2]) > 1e-3 * max(1.0, np.linalg.norm(a)) or abs(b[2]) > 1e-3 * max(1.0, np.linalg.norm(b)):
        raise SimulationError("cell vectors a and b must lie in the xy plane (layer normal along z)")
    area = abs(a[0] * b[1] - a[1] * b[0])
    if area < 0.5:
        raise SimulationError(f"in-plane cell area {area:.3g} Å² is degenerate; is this a 2D layer cell?")
    if np.linalg.norm(a[:2]) > 200 or np.linalg.norm(b[:2]) > 200:
        raise SimulationError("in-plane cell vectors longer than 200 Å are not supported")
    if not np.all(np.isfinite(atoms.positions)):
        raise SimulationError("structure has non-finite atomic positions")


def strain_matrix(strain) -> np.ndarray:
    """In-plane deformation gradient F = I + ε for a scalar (biaxial) or 2×2 strain."""
    if strain is None:
        return np.eye(2)
    eps = np.asarray(strain, dtype=float)
    if eps.ndim == 0:
        eps = float(eps) * np.eye(2)
    if eps.shape != (2, 2) or not np.all(np.isfinite(eps)):
        raise SimulationError(f"strain must be a scalar or a 2×2 in-plane tensor, got shape {eps.shape}")
    F = np.eye(2) + eps
    if np.linalg.det(F) <= 0.1 or np.max(np.abs(eps)) > 0.5:
        raise SimulationError(f"strain {eps.tolist()} is unphysical (|ε| > 50 % or inverts the cell)")
    return F


def apply_strain_2d(atoms, strain):
    """Deform positions and cell in-plane (x, y) by F = I + ε; z is untouched."""
    F = strain_matrix(strain)
    out = atoms.copy()
    if np.allclose(F, np.eye(2)):
        return out
    F3 = np.eye(3)
    F3[:2, :2] = F
    out.set_cell(np.asarray(out.cell[:]) @ F3.T, scale_atoms=False)
    out.positions = out.positions @ F3.T
    return out


@dataclass(frozen=True)
class OrthogonalCell:
    """An orthogonal supercell and the affine map that produced it.

    ``atoms`` has cell ``diag(L_x, L_y, L_z)``; for every in-plane point, r_box = ``matrix`` @ r_orig (up
    to a lattice translation). ``matrix`` is a rotation times a small shear (``shear`` = its size), so
    Fourier coefficients at box reciprocal vectors g map exactly to G = matrixᵀ g in the original frame.
    """

    atoms: object
    matrix: np.ndarray
    shear: float
    repetitions: int


def orthogonal_cell(atoms, max_repetitions: int = 6, tolerance: float = 0.01) -> OrthogonalCell:
    """Smallest orthogonal in-plane supercell (within ``max_repetitions``), rotated so A1 ∥ x.

    Unlike a strained orthogonalisation, the residual shear is returned so the caller maps the
    periodicity back exactly; only the atom shapes see the (≤ ``tolerance``) shear.
    """
    from ase.build import make_supercell

    validate_layer(atoms)
    cell = np.asarray(atoms.cell[:], dtype=float)
    a, b = cell[0, :2], cell[1, :2]
    n = max_repetitions
    vecs = []
    for i, j in itertools.product(range(-n, n + 1), repeat=2):
        if (i, j) == (0, 0):
            continue
        v = i * a + j * b
        vecs.append((np.linalg.norm(v), i, j, v))
    vecs.sort(key=lambda t: t[0])
    best = None
    for (l1, i1, j1, v1), (l2, i2, j2, v2) in itertools.product(vecs[:80], vecs[:200]):
        det = abs(i1 * j2 - j1 * i2)
        if det == 0 or det > n * n or v1[0] * v2[1] - v1[1] * v2[0] <= 0:
            continue
        cos = abs(float(v1 @ v2)) / (l1 * l2)
        if cos > max(tolerance, 0.2):
            continue
        shear = cos / np.sqrt(1 - cos**2)
        ok = shear <= tolerance
        key = (not ok, det if ok else shear, round(l1 + l2, 6), abs(np.arctan2(v1[1], v1[0])))
        if best is None or key < best[0]:
            best = (key, (i1, j1), (i2, j2), det)
    if best is None:
        raise SimulationError("could not find an orthogonal supercell for this lattice")
    _, (i1, j1), (i2, j2), det = best
    P = np.array([[i1, j1, 0], [i2, j2, 0], [0, 0, 1]])
    sup = make_supercell(atoms, P, wrap=True)
    sc = np.asarray(sup.cell[:], dtype=float)
    A1, A2 = sc[0, :2], sc[1, :2]
    ang = np.arctan2(A1[1], A1[0])
    R = np.array([[np.cos(-ang), -np.sin(-ang)], [np.sin(-ang), np.cos(-ang)]])
    A2r = R @ A2
    if A2r[1] < 0:  # keep a right-handed box: mirror would change the image, so flip A2 instead
        raise SimulationError("orthogonal supercell search produced a left-handed cell")
    S = np.array([[1.0, -A2r[0] / A2r[1]], [0.0, 1.0]])
    M = S @ R
    Lx, Ly = float(np.linalg.norm(A1)), float(A2r[1])
    pos = sup.positions.copy()
    pos[:, :2] = pos[:, :2] @ M.T
    out = sup.copy()
    out.set_cell(np.diag([Lx, Ly, sc[2, 2] if sc[2, 2] > 0 else 10.0]), scale_atoms=False)
    out.positions = pos
    out.wrap(pbc=(True, True, False))
    out.pbc = (True, True, False)
    return OrthogonalCell(atoms=out, matrix=M, shear=float(abs(A2r[0] / A2r[1])), repetitions=int(det))


def reduced_formula(atoms) -> str:
    """Conventional reduced formula (MoS2, ZnF2), independent of atom order."""
    from pymatgen.core import Composition

    return Composition(atoms.get_chemical_formula(mode="hill")).reduced_formula
