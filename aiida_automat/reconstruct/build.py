"""From a registration to a simulation-ready structure: cell, atoms with heights, symmetry.

The in-plane fractional coordinates come from the image; the heights of the atoms in each column come
from the template (a projection has no depth). The cell is the measured lattice, except where the
measurement says the calibration or the scan is off:

* calibration: if the measured cell area differs from the template's by more than ``calibration_tol``
  (default 4 %, beyond plausible strain of a monolayer), the pixel size is taken to be wrong; the cell is
  rescaled to the template's area and the implied pixel size is reported. A smaller uniform mismatch is
  strain or calibration, and the image cannot tell which: as much of it as the image's pixel-size tolerance
  allows (``pixel_size_tolerance``: 0 for an exactly calibrated image, ±5 % by default for a real one) is put
  on the calibration — monolayers are rarely strained by more than a per cent, so with a pixel size good to
  ±5 % the template's lattice is the better estimate, and a cell strained by the calibration error would
  carry that error into every energy computed on it;
* scan distortion: an anisotropic deviation from the template's cell shape beyond ``strain_tol``
  (default 2 %: a biaxially strained monolayer has none, and real scans often show 3–10 %) is attributed to the scan, removed, and reported.

Within the tolerances the measured lattice is kept — the strain in the sample is real and is measured,
not copied from the template. Both assumptions are reported in the diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.geometry import cell_to_cellpar, cellpar_to_cell

from ..errors import NoCandidate
from .registration import Registration, polar_map

VACUUM_A = 20.0
#: beyond this size ratio a mismatch is no calibration error: the template (or the pixel size) is wrong
MAX_CALIBRATION_FACTOR = 1.35
#: beyond this anisotropic deviation a cell-shape mismatch is no scan distortion: the template is wrong.
#: Drift and fly-back distortions seen in practice are 3–9 % (8.7 % on the real scilink MoS2 scan; a 0.1
#: shear is ~5 %); a bulk crystal in a zone axis with a similar cell (Si[110]: 3.33 Å, 109.5° vs MoS2's
#: 3.18 Å, 120°) is 11 %. The margin is thin: the closed-loop verification is the second line of defence.
MAX_ANISOTROPY = 0.10


@dataclass(frozen=True, eq=False)
class BuiltStructure:
    atoms: Atoms
    cell_measured_A: np.ndarray  # (2, 2) measured in-plane cell, (x, y) Å, claimed calibration
    strain: np.ndarray  # 2x2 symmetric strain of the measured cell relative to the template
    calibration_factor: float  # measured / template size; when corrected, the part put on the pixel size
    calibration_corrected: bool
    distortion_removed: bool
    anisotropy: float  # largest |principal strain − mean|
    mirrored: bool
    spacegroup: str | None
    spacegroup_number: int | None
    symprec_A: float | None
    notes: tuple[str, ...] = field(default_factory=tuple)


def _to_xy(vectors_rowcol_A: np.ndarray) -> np.ndarray:
    """Image (row, col) components → (x, y) with x = col, y = row."""
    return np.asarray(vectors_rowcol_A, dtype=float)[:, ::-1].copy()


def _strain(measured_xy: np.ndarray, template_xy: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric strain ε (and det sign) of the map template → measured (polar decomposition)."""
    _, stretch, handed = polar_map(template_xy, measured_xy)
    return stretch - np.eye(2), handed


def anisotropy(eps: np.ndarray) -> float:
    """Anisotropic part of an in-plane strain (max |εᵢ − mean ε|): what a scan distortion must explain, refused
    above ``MAX_ANISOTROPY`` here and screened with the same number in retrieval."""
    evals = np.linalg.eigvalsh(eps)
    return float(np.max(np.abs(evals - evals.mean())))


def build_structure(reg: Registration, vectors_A_rowcol: np.ndarray, *, calibration_tol: float = 0.04,
                    strain_tol: float = 0.02, symmetrize: bool = True, symprec_A: float = 0.1,
                    template_spacegroup: int | None = None, max_symprec_A: float = 0.3,
                    pixel_size_tolerance: float = 0.0) -> BuiltStructure:
    measured = _to_xy(vectors_A_rowcol)
    template = reg.motif.cell_xy
    eps, handed = _strain(measured, template)
    aniso = anisotropy(eps)
    notes = []
    k = float(np.sqrt(abs(np.linalg.det(measured)) / abs(np.linalg.det(template))))
    if not 1.0 / MAX_CALIBRATION_FACTOR <= k <= MAX_CALIBRATION_FACTOR:
        raise NoCandidate(
            f"the measured cell is {k:.2f}× the size of the {reg.motif.formula} template's: more than any plausible "
            "calibration error — wrong template, or check the pixel size"
        )
    if aniso > MAX_ANISOTROPY:
        raise NoCandidate(
            f"the measured cell's shape deviates {100 * aniso:.1f}% from the {reg.motif.formula} template's, more than "
            f"any plausible scan distortion ({100 * MAX_ANISOTROPY:.0f}%): wrong template"
        )
    tol = abs(float(pixel_size_tolerance))
    k_cal = k if abs(k - 1.0) > calibration_tol else float(np.clip(k, 1.0 - tol, 1.0 + tol))
    corrected = k_cal != 1.0
    cell = measured / k_cal if corrected else measured.copy()
    if corrected:
        why = "" if abs(k - 1.0) > calibration_tol else f", within the pixel size's ±{100 * tol:.0f}% tolerance"
        rest = f"; {100 * (k / k_cal - 1):+.1f}% kept as strain" if abs(k / k_cal - 1.0) > 1e-9 else ""
        notes.append(
            f"measured cell is {100 * (k - 1):+.1f}% from the template's: attributed to the pixel-size "
            f"calibration{why} (implied pixel size ×{1 / k_cal:.4f}){rest}"
        )
    removed = aniso > strain_tol
    if removed:
        # keep the measured orientation and area, take the template's shape
        rot = polar_map(template, cell)[0]
        size = float(np.sqrt(abs(np.linalg.det(cell)) / abs(np.linalg.det(template))))
        cell = (template @ rot.T) * size
        notes.append(f"anisotropic deviation {100 * aniso:.1f}% > {100 * strain_tol:.0f}%: removed as scan distortion")
    frac = np.asarray(reg.frac, dtype=float)
    mirrored = handed < 0
    # atoms: fractional in-plane from the image, heights from the template
    zs = [z for col in reg.motif.columns for z in col.z_A]
    zmid = 0.5 * (max(zs) + min(zs)) if zs else 0.0
    c = max(VACUUM_A + reg.motif.thickness_A, 15.0 + reg.motif.thickness_A)
    symbols, scaled = [], []
    for f, col in zip(frac, reg.motif.columns):
        for sym, z in zip(col.symbols, col.z_A):
            dz = (z - zmid) * (-1.0 if mirrored else 1.0)  # seen from the other side: flip the layer
            symbols.append(sym)
            scaled.append([f[0], f[1], 0.5 + dz / c])
    scaled = np.array(scaled)
    if np.linalg.det(cell) < 0:  # relabel a1 <-> a2 for a right-handed cell (no geometric change)
        cell = cell[::-1].copy()
        scaled = scaled[:, [1, 0, 2]]
    a, b = np.linalg.norm(cell, axis=1)
    gamma = float(np.degrees(np.arccos(np.clip(np.dot(cell[0], cell[1]) / (a * b), -1, 1))))
    atoms = Atoms(symbols=symbols, scaled_positions=np.mod(scaled, [1, 1, 2]),
                  cell=cellpar_to_cell([a, b, c, 90.0, 90.0, gamma]), pbc=(True, True, False))
    sg, sgn, prec = None, None, None
    if symmetrize:
        atoms, sg, sgn, prec = _symmetrize_towards(atoms, symprec_A, template_spacegroup, max_symprec_A)
        if prec is not None and prec > symprec_A:
            notes.append(f"symmetry of the template ({sg}) reached at tolerance {prec:.2f} Å")
    return BuiltStructure(atoms, measured, eps, k_cal if corrected else k, corrected, removed, aniso, mirrored, sg, sgn,
                          prec, tuple(notes))


def spacegroup_number(atoms: Atoms, symprec_A: float) -> int | None:
    """Space group within ``symprec_A``, or None where spglib finds none or refuses the cell (it raises, e.g.
    "too close distance between atoms", when two atoms fall within the tolerance of each other)."""
    import spglib
    from spglib.error import SpglibError

    work = (atoms.cell.array, atoms.get_scaled_positions(wrap=True), atoms.numbers)
    try:
        data = spglib.get_symmetry_dataset(work, symprec=symprec_A)
    except SpglibError:
        return None
    return None if data is None else int(data.number)


def _symmetrize_towards(atoms: Atoms, symprec_A: float, target: int | None, max_symprec_A: float):
    """Symmetrise at ``symprec_A``; if the template's space group is only reached at a looser tolerance
    (≤ ``max_symprec_A``: real images have ~0.05–0.1 Å systematic position errors from probe tails, drift
    and contamination), use the loosest tolerance that reaches it — never more symmetry than the template.
    """
    if target is not None:
        for tol in np.arange(symprec_A, max_symprec_A + 1e-9, 0.025):
            number = spacegroup_number(atoms, float(tol))
            if number == target:
                return _symmetrize(atoms, float(tol))
        # Not reached: the image may be *more* symmetric than the template within symprec_A (Se2's nearly
        # square 2.67 × 5.32 Å cell is P4/mmm at 0.1 Å, the template Pmma only below 0.02 Å) — symmetrising
        # there would square the measured cell. Use the loosest tolerance that adds no symmetry.
        limit = _group_order(target)
        for tol in np.arange(symprec_A, 0.0, -0.01):
            number = spacegroup_number(atoms, float(tol))
            if number is not None and _group_order(number) <= limit:
                return _symmetrize(atoms, float(tol))
        return atoms, None, None, None
    return _symmetrize(atoms, symprec_A)


def _group_order(number: int) -> int:
    """Point-group order of space group ``number`` (lattice centring divided out)."""
    from ase.spacegroup import Spacegroup

    sg = Spacegroup(int(number))
    return len(sg.get_op()[0]) // len(sg.subtrans)


def _symmetrize(atoms: Atoms, symprec_A: float):
    """Idealise positions to the symmetry found within ``symprec_A``; the cell orientation is kept."""
    from ase.spacegroup.symmetrize import check_symmetry, refine_symmetry

    work = atoms.copy()
    work.pbc = True  # spglib needs a 3D cell; the vacuum makes z non-periodic in practice
    try:
        refine_symmetry(work, symprec=symprec_A, verbose=False)
        data = check_symmetry(work, symprec=1e-4)
    except Exception:  # noqa: BLE001 - spglib can fail on degenerate input: keep unsymmetrised
        return atoms, None, None, None
    if data is None or len(work) != len(atoms):
        return atoms, None, None, None
    # keep the layer flat in-plane cell (refine_symmetry may touch c slightly)
    cellpar = cell_to_cellpar(work.cell)
    out = Atoms(work.get_chemical_symbols(), scaled_positions=work.get_scaled_positions(wrap=True),
                cell=cellpar_to_cell(cellpar), pbc=(True, True, False))
    return out, str(data.international), int(data.number), float(symprec_A)
