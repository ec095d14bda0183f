"""Structure sets for the template library: loading and 2D standardisation.

Every template is stored in one canonical form so that descriptors of different sources are comparable:
the *primitive* 2D cell (found by searching in-plane pure translations, because databases sometimes
hand out supercells), Gauss-reduced (|a| <= |b|, |a·b| <= |a|²/2), right-handed, a along x, the layer
normal along z and the layer centred in c. Reduction is done here in plain numpy: it is ~100x faster
than a full spglib standardisation and a 2D lattice only needs the in-plane reduction.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import LibraryError

__all__ = [
    "BUNDLED_SETS",
    "TemplateStructure",
    "bundled_structure_files",
    "classify_lattice",
    "gauss_reduce",
    "load_structure_set",
    "standardise_2d",
]

RESOURCES = pathlib.Path(__file__).resolve().parents[1] / "resources" / "structures"

#: name → file of the bundled sets (see resources/SOURCES.md for origin and licence).
BUNDLED_SETS = {
    "2dmatpedia": "2dmatpedia_subset.extxyz",
    "mc2d": "mc2d_mounet2018.extxyz",
}

STRUCTURE_SUFFIXES = (".extxyz", ".xyz", ".cif", ".vasp", ".poscar", ".json", ".traj")


def bundled_structure_files() -> list[pathlib.Path]:
    files = [RESOURCES / name for name in BUNDLED_SETS.values()]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LibraryError(f"bundled structure file(s) missing from the installation: {', '.join(missing)}")
    return files


@dataclass(frozen=True)
class TemplateStructure:
    """One standardised template structure and where it came from."""

    template_id: str
    atoms: object  # ase.Atoms, standardised
    source: str
    formula: str
    anonymous_formula: str
    elements: tuple[str, ...]
    lattice_type: str
    info: dict = field(default_factory=dict)

    @property
    def cell_2d(self) -> np.ndarray:
        return np.asarray(self.atoms.cell[:2, :2], dtype=float)


def gauss_reduce(a: np.ndarray, b: np.ndarray, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lagrange–Gauss reduction of a 2D basis: |a| <= |b| and |a·b| <= |a|²/2, right-handed."""
    a = np.asarray(a, dtype=float).copy()
    b = np.asarray(b, dtype=float).copy()
    for _ in range(max_iter):
        if a @ a > b @ b:
            a, b = b, a
        mu = np.round((a @ b) / (a @ a))
        if mu == 0:
            break
        b = b - mu * a
    if a @ a > b @ b + 1e-12:
        a, b = b, a
    if a[0] * b[1] - a[1] * b[0] < 0:
        b = -b
    return a, b


def classify_lattice(cell_2d: np.ndarray, tol: float = 0.02) -> str:
    """Bravais type of a 2D lattice from its reduced basis: hexagonal, square, rectangular,
    centred-rectangular or oblique (relative tolerance ``tol``)."""
    a, b = gauss_reduce(cell_2d[0], cell_2d[1])
    la, lb = np.linalg.norm(a), np.linalg.norm(b)
    cosg = float(a @ b) / (la * lb)
    same = abs(la - lb) <= tol * la
    if same and abs(abs(cosg) - 0.5) <= tol:
        return "hexagonal"
    if abs(cosg) <= tol:
        return "square" if same else "rectangular"
    if same or abs(2 * abs(a @ b) - la * la) <= tol * la * la:
        return "centred-rectangular"
    return "oblique"


def _primitive_translations(frac: np.ndarray, numbers: np.ndarray, z: np.ndarray, tol_A: float, cell2: np.ndarray):
    """In-plane fractional translations (other than lattice vectors) mapping the layer onto itself."""
    species, counts = np.unique(numbers, return_counts=True)
    ref = species[np.argmin(counts)]
    idx = np.flatnonzero(numbers == ref)
    i0 = idx[0]
    found = []
    for j in idx[1:]:
        t = frac[j] - frac[i0]
        t = t - np.round(t)
        if abs(z[j] - z[i0]) > tol_A:
            continue
        moved = frac + t
        d = moved[:, None, :] - frac[None, :, :]
        d -= np.round(d)
        dcart = d @ cell2
        dist = np.sqrt(np.sum(dcart**2, axis=-1) + (z[:, None] - z[None, :]) ** 2)
        same = numbers[:, None] == numbers[None, :]
        dist = np.where(same, dist, np.inf)
        if np.all(dist.min(axis=1) < tol_A):
            found.append(t)
    return found


def standardise_2d(atoms, tol_A: float = 0.05):
    """Primitive, Gauss-reduced, right-handed 2D cell with a ∥ x, normal along z, layer centred in c."""
    from ase import Atoms

    cell = np.asarray(atoms.cell[:], dtype=float)
    if cell.shape != (3, 3) or abs(np.linalg.det(cell)) < 1e-6:
        raise LibraryError("structure has no 3D cell")
    if np.max(np.abs(cell[:2, 2])) > 1e-3 * max(1.0, np.max(np.abs(cell[:2]))) or np.max(np.abs(cell[2, :2])) > 1e-3 * max(1.0, abs(cell[2, 2])):
        raise LibraryError("cell vectors a, b must lie in-plane and c along z (layer normal along z)")
    c_len = float(abs(cell[2, 2]))
    cell2 = cell[:2, :2]
    pos = np.asarray(atoms.positions, dtype=float)
    numbers = np.asarray(atoms.numbers)
    frac = np.linalg.solve(cell2.T, pos[:, :2].T).T
    frac -= np.floor(frac)
    z = pos[:, 2]
    # 1. primitive in-plane lattice
    trans = _primitive_translations(frac, numbers, z, tol_A, cell2) if len(atoms) > 1 else []
    lattice_pts = [cell2[0], cell2[1]] + [t @ cell2 for t in trans]
    a, b = cell2[0].copy(), cell2[1].copy()
    if trans:
        # shortest independent pair from all lattice vectors (translations + small combinations)
        vecs = []
        for v in lattice_pts:
            for i in (-1, 0, 1):
                for j in (-1, 0, 1):
                    w = v + i * cell2[0] + j * cell2[1]
                    if np.linalg.norm(w) > 1e-6:
                        vecs.append(w)
        vecs = sorted(vecs, key=lambda v: float(v @ v))
        a = vecs[0]
        area0 = abs(np.linalg.det(cell2)) / (len(trans) + 1)
        for v in vecs[1:]:
            if abs(a[0] * v[1] - a[1] * v[0]) > 0.5 * area0:
                b = v
                break
    a, b = gauss_reduce(a, b)
    # 2. rotate a onto x
    ang = np.arctan2(a[1], a[0])
    R = np.array([[np.cos(ang), np.sin(ang)], [-np.sin(ang), np.cos(ang)]])
    new2 = np.array([R @ a, R @ b])
    new2[0, 1] = 0.0
    xy = pos[:, :2] @ R.T
    f = np.linalg.solve(new2.T, xy.T).T
    f -= np.floor(f)
    f[np.abs(f - 1.0) < 1e-8] = 0.0
    # 3. remove images that collapsed onto each other (supercell → primitive)
    keep = []
    cart = f @ new2
    for i in range(len(f)):
        dup = False
        for k in keep:
            d = f[i] - f[k]
            d -= np.round(d)
            if numbers[i] == numbers[k] and np.linalg.norm(d @ new2) < tol_A and abs(z[i] - z[k]) < tol_A:
                dup = True
                break
        if not dup:
            keep.append(i)
    keep = np.asarray(keep)
    zc = z[keep] - 0.5 * (z[keep].max() + z[keep].min()) + 0.5 * c_len
    cart = cart[keep]
    cell3 = np.zeros((3, 3))
    cell3[:2, :2] = new2
    cell3[2, 2] = c_len
    out = Atoms(numbers=numbers[keep], positions=np.column_stack([cart, zc]), cell=cell3, pbc=(True, True, False))
    out.info.update({k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, bool, np.integer, np.floating))})
    return out


def _anonymous(atoms) -> tuple[str, str, tuple[str, ...]]:
    from ase.formula import Formula

    formula = Formula.from_list(atoms.get_chemical_symbols())
    reduced = formula.reduce()[0]
    counts = sorted(reduced.count().values())
    letters = "ABCDEFGHIJ"
    anon = "".join(f"{letters[i]}{n if n > 1 else ''}" for i, n in enumerate(counts))
    return str(reduced), anon, tuple(sorted(set(atoms.get_chemical_symbols())))


def _template_id(atoms, stem: str, i: int) -> str:
    for key in ("material_id", "structure_label", "template_id", "id", "name"):
        if key in atoms.info and str(atoms.info[key]):
            return str(atoms.info[key])
    return f"{stem}-{i}"


def _read_any(path: pathlib.Path) -> list:
    from ase.io import read

    try:
        res = read(str(path), index=":")
    except Exception as exc:  # noqa: BLE001
        raise LibraryError(f"cannot read structures from {path.name}: {exc}") from None
    return list(res) if isinstance(res, list) else [res]


def structure_files(path) -> list[pathlib.Path]:
    """A file, or every structure file (extxyz, xyz, CIF, POSCAR, ...) in a folder, sorted."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix.lower() in STRUCTURE_SUFFIXES or p.name.upper().startswith("POSCAR")))
        if not files:
            raise LibraryError(f"no structure files (extxyz, CIF, POSCAR, ...) in {path}")
        return files
    raise LibraryError(f"structure path {path} does not exist")


def load_structure_set(paths=None, *, ids=None, skip_invalid: bool = True) -> list[TemplateStructure]:
    """Read and standardise structures from files/folders (``None``: the bundled sets).

    ``ids`` restricts to those template ids (in the given order of the files). Structures that are not a
    2D layer with the normal along z are skipped (or raise when ``skip_invalid`` is False).
    """
    if paths is None:
        files = bundled_structure_files()
    else:
        if isinstance(paths, (str, pathlib.Path)):
            paths = [paths]
        files = [f for p in paths for f in structure_files(p)]
    wanted = None if ids is None else set(ids)
    out: list[TemplateStructure] = []
    seen: set[str] = set()
    for f in files:
        stem = f.stem
        for i, atoms in enumerate(_read_any(f)):
            tid = _template_id(atoms, stem, i)
            if wanted is not None and tid not in wanted:
                continue
            if tid in seen:
                tid = f"{stem}:{tid}"
            try:
                std = standardise_2d(atoms)
            except LibraryError:
                if not skip_invalid:
                    raise
                continue
            seen.add(tid)
            out.append(make_template(std, tid, source=stem))
    if not out:
        raise LibraryError("no usable 2D structures were found")
    return out


def make_template(atoms, template_id: str, source: str = "user") -> TemplateStructure:
    formula, anon, elements = _anonymous(atoms)
    info = {k: v for k, v in atoms.info.items()}
    return TemplateStructure(
        template_id=str(template_id),
        atoms=atoms,
        source=source,
        formula=formula,
        anonymous_formula=anon,
        elements=elements,
        lattice_type=classify_lattice(np.asarray(atoms.cell[:2, :2])),
        info=info,
    )
