"""How a reconstructed structure is judged against the truth (benchmarks and tests).

Success is pymatgen's StructureMatcher with the tolerances AutoMat's STEM2Mat benchmark uses (ltol 0.2,
stol 0.3, angle_tol 5). The projected RMSD is measured in Å on the matched sites, in-plane only (what an
image can show), after the matcher has mapped the reconstruction onto the true lattice — so a 2 % lattice
error does not masquerade as a position error, and it is reported separately as the lattice error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LTOL, STOL, ANGLE_TOL = 0.2, 0.3, 5.0


@dataclass(frozen=True)
class Match:
    success: bool
    projected_rmsd_A: float | None
    lattice_error_pct: float | None  # max relative error of a, b; |Δγ| in % of γ ignored
    gamma_error_deg: float | None
    formula_ok: bool


def _pmg(atoms):
    from pymatgen.io.ase import AseAtomsAdaptor

    a = atoms.copy()
    a.pbc = True  # pymatgen's Niggli reduction refuses partially periodic lattices
    return AseAtomsAdaptor.get_structure(a)


def _cellpar_2d(atoms):
    a, b = np.linalg.norm(atoms.cell[:2, :2], axis=1)
    ga = np.degrees(np.arccos(np.clip(np.dot(atoms.cell[0, :2], atoms.cell[1, :2]) / (a * b), -1, 1)))
    return np.array([a, b]), float(ga)


def compare(truth, reconstructed) -> Match:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    s1, s2 = _pmg(truth), _pmg(reconstructed)
    formula_ok = s1.composition.reduced_formula == s2.composition.reduced_formula
    matcher = StructureMatcher(ltol=LTOL, stol=STOL, angle_tol=ANGLE_TOL, primitive_cell=True, scale=False,
                               attempt_supercell=True)
    try:
        ok = bool(matcher.fit(s1, s2))
    except Exception:  # noqa: BLE001 - degenerate cells make pymatgen raise; that is a failure
        ok = False
    rmsd = None
    if ok:
        mapper = StructureMatcher(ltol=LTOL, stol=STOL, angle_tol=ANGLE_TOL, primitive_cell=False, scale=False,
                                  attempt_supercell=True)
        try:
            like = mapper.get_s2_like_s1(s1, s2)
        except Exception:  # noqa: BLE001 - no site mapping: success stands, RMSD unknown
            like = None
        if like is not None and len(like) == len(s1):
            d = np.array([site.frac_coords for site in like]) - np.array([site.frac_coords for site in s1])
            d -= np.round(d)
            cart = d @ s1.lattice.matrix
            # in-plane (projected) part; the layer normal is the third vector's direction
            normal = s1.lattice.matrix[2] / np.linalg.norm(s1.lattice.matrix[2])
            inplane = cart - np.outer(cart @ normal, normal)
            rmsd = float(np.sqrt(np.mean(np.sum(inplane**2, axis=1))))
    # lattice error on the reduced in-plane cells (order-independent)
    ab_t, g_t = _reduced_2d(truth)
    ab_r, g_r = _reduced_2d(reconstructed)
    lat_err = float(np.max(np.abs(np.sort(ab_r) / np.sort(ab_t) - 1.0)) * 100.0)
    return Match(ok, rmsd, lat_err, float(abs(g_r - g_t)), formula_ok)


def _reduced_2d(atoms):
    from ..lattice.measure import cell_parameters, reduce_basis

    cell = np.asarray(atoms.cell[:2, :2], dtype=float)
    red = reduce_basis(cell) @ cell
    a, b, g = cell_parameters(red)
    return np.array([a, b]), g
