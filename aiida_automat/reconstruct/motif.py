"""A template structure seen along the beam: its in-plane cell and its projected columns.

Atoms that sit on top of each other in projection (the S–S pair of MoS2) form one column; the column keeps
all its atoms with their heights, so a reconstructed structure is never flattened to one plane.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..imaging.structures import reduced_formula
from ..lattice.measure import reduce_basis

COLUMN_MERGE_A = 0.3


@dataclass(frozen=True)
class Column:
    frac: np.ndarray  # (2,) fractional in-plane position in the motif basis
    symbols: tuple[str, ...]
    z_A: tuple[float, ...]

    @property
    def label(self) -> str:
        return "+".join(sorted(self.symbols))


@dataclass(frozen=True, eq=False)
class Motif:
    cell_xy: np.ndarray  # (2, 2) rows a1, a2 in Å (x, y)
    columns: tuple[Column, ...]
    thickness_A: float
    formula: str

    def with_basis(self, U: np.ndarray) -> "Motif":
        """The same motif in the basis ``U @ cell`` (U integer, det ±1)."""
        U = np.asarray(U, dtype=float)
        inv = np.linalg.inv(U)
        cols = tuple(Column(np.mod(c.frac @ inv, 1.0), c.symbols, c.z_A) for c in self.columns)
        return Motif(U @ self.cell_xy, cols, self.thickness_A, self.formula)


def motif_from_atoms(atoms, merge_A: float = COLUMN_MERGE_A) -> Motif:
    """Project a layer (normal along z) onto its reduced in-plane cell and merge stacked atoms."""
    cell = np.asarray(atoms.cell[:2, :2], dtype=float)
    M = reduce_basis(cell)
    cell_red = M @ cell
    frac = np.linalg.solve(cell_red.T, atoms.positions[:, :2].T).T
    frac = np.mod(frac, 1.0)
    z = atoms.positions[:, 2]
    symbols = atoms.get_chemical_symbols()
    used = np.zeros(len(atoms), dtype=bool)
    columns = []
    shifts = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=float)
    for i in np.argsort(frac[:, 0] + 1e-3 * frac[:, 1]):
        if used[i]:
            continue
        d = (frac[None, :, :] + shifts[:, None, :] - frac[i][None, None, :]) @ cell_red
        dist = np.linalg.norm(d, axis=-1).min(axis=0)
        members = np.where((dist < merge_A) & ~used)[0]
        used[members] = True
        order = members[np.argsort(z[members])]
        columns.append(Column(frac[i].copy(), tuple(symbols[k] for k in order), tuple(float(z[k]) for k in order)))
    thickness = float(np.ptp(z)) if len(z) else 0.0
    return Motif(cell_red, tuple(columns), thickness, reduced_formula(atoms))


@functools.lru_cache(maxsize=4)
def unimodular_matrices(max_entry: int = 2) -> tuple[np.ndarray, ...]:
    """All integer 2×2 matrices with |det| = 1 and entries within ±max_entry (cached: registration asks for
    them for every candidate cell relation)."""
    r = range(-max_entry, max_entry + 1)
    out = []
    for a in r:
        for b in r:
            for c in r:
                for d in r:
                    if abs(a * d - b * c) == 1:
                        m = np.array([[a, b], [c, d]], dtype=float)
                        m.setflags(write=False)
                        out.append(m)
    return tuple(out)
