"""Register a template's motif onto the measured lattice and refine it against the image.

Everything happens on the average unit cell (``cellavg``): the image's lattice harmonics. For each way
the template cell can correspond to the measured cell (equivalent bases, mirror), the template's
physical image coefficients (fast model) are correlated with the observed ones over all origin shifts;
the best correspondence fixes which observed column is which template site. Column positions, a blur
and per-column intensity factors are then refined by least squares against the observed coefficients,
using each column's own physical Fourier contribution, so contrast differences between species are
modelled, not ranked; the template's positions and intensities enter as a weak prior, which only the columns
the image cannot see feel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from ..errors import NoCandidate
from ..imaging.microscope import Microscope
from .cellavg import CellAverage
from .motif import Motif, motif_from_atoms, unimodular_matrices

SHIFT_GRID = 72
#: prior width (Å) of a column's displacement from its template site in the refinement: the template is the
#: prior, the image the evidence. A visible column is located to ~0.01 Å and does not feel it; a column the
#: image cannot see (H in ADF, σ ≈ 0.3–0.5 Å from the data alone) stays near its template site instead of
#: wandering off with noise and model errors (NaGaH4 ADF: H moved ~1 Å, the structure failed to match)
POSITION_PRIOR_A = 0.3
#: prior width of a column's intensity factor around the physical model's (relative): same reasoning — a visible
#: column's factor is fixed by the data (and still flags a wrong species), an invisible one cannot grow to
#: absorb noise and drag its position along
INTENSITY_PRIOR = 0.5
#: sub-lattices of one index whose sizes agree with the best one's within this (relative) are equally good
#: choices of the template's cell as far as size goes, and the image decides between them (``lattice_options``).
#: Strain and calibration scale all orientations alike; what separates their sizes is the measured lattice's
#: noise and scan distortion (≲ 1 %) and the template's own deviation from the sub-lattice's symmetry (GaHO₂:
#: b/a = 1.741 against √3, 0.5 %)
ORIENTATION_TIE = 0.03


@dataclass(frozen=True, eq=False)
class Registration:
    motif: Motif  # template motif in the basis that corresponds to the measured basis
    basis_change: np.ndarray  # U: motif basis = U @ reduced template basis
    shape_mismatch: float  # relative metric mismatch image vs template (0 = same cell shape)
    scale: float  # measured / template cell size (claimed calibration)
    shift: np.ndarray  # origin shift (fractional)
    frac: np.ndarray  # (n_columns, 2) refined fractional positions in the measured basis
    frac_sigma: np.ndarray  # (n_columns, 2) 1σ uncertainties (fractional)
    intensity: np.ndarray  # (n_columns,) fitted intensity factors relative to the physical model
    blur_A: float  # extra Gaussian blur (σ) needed to match the image
    score: float  # NCC of the physical template (before refinement) with the observed cell
    fit_r2: float  # fraction of the observed periodic signal explained after refinement
    column_coeffs: np.ndarray  # (n_columns, n_hk) physical coefficients of each column at the origin


def _hk_of(g_invA: np.ndarray, cell_xy: np.ndarray) -> np.ndarray:
    return np.rint(g_invA @ cell_xy.T).astype(int)


def polar_map(template_xy: np.ndarray, measured_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The linear map L of a template cell onto a measured one (rows (x, y); measured = template @ Lᵀ) split as
    L = R·S: R orthogonal (rotation, or rotation and mirror), S the symmetric stretch; and the sign of det L."""
    L = np.linalg.solve(template_xy, measured_xy).T
    u, s, vt = np.linalg.svd(L)
    return u @ vt, vt.T @ np.diag(s) @ vt, float(np.sign(np.linalg.det(L)))


def image_frame(motif: Motif, V_A: np.ndarray) -> np.ndarray:
    """The orthogonal map (rotation, or rotation and mirror) that carries the motif's cell onto the measured cell
    ``V_A`` ((row, col) components) in the image's (x = col, y = row) frame."""
    return polar_map(motif.cell_xy, np.asarray(V_A, dtype=float)[:, ::-1])[0]


def _column_coefficients(motif: Motif, microscope: Microscope, hk: np.ndarray, gmax: float,
                         frame: np.ndarray | None = None, detector_angle_deg: float = 0.0) -> np.ndarray:
    """Per-column physical Fourier coefficients (n_columns, n_hk) at the observed indices, phase at origin.

    ``frame`` (``image_frame``) turns the motif's cell the way the crystal lies in the image, so that a
    segmented detector at ``detector_angle_deg`` in the image sees each reflection from the direction it
    really has (the template's own axes are an arbitrary setting: Be's 1.98 Å primitive square cell and its
    2.79 Å conventional one differ by 45°, and modelled in their own frames the same image verified at 0.992 with
    a 0.22 Å blur against 0.997 with none). Column sizes stay the template's: only directions change."""
    from ase import Atoms

    from ..imaging.fastsim import cell_fourier_coefficients

    cell_xy = motif.cell_xy if frame is None else motif.cell_xy @ np.asarray(frame, dtype=float).T
    cell3 = np.zeros((3, 3))
    cell3[:2, :2] = cell_xy
    cell3[2, 2] = max(20.0, motif.thickness_A + 15.0)
    out = np.zeros((len(motif.columns), len(hk)), dtype=complex)
    lookup = {tuple(x): i for i, x in enumerate(hk)}
    for j, col in enumerate(motif.columns):
        positions = [[0.0, 0.0, z - min(col.z_A) + cell3[2, 2] / 2 - 1.0] for z in col.z_A]
        atoms = Atoms(symbols=list(col.symbols), positions=positions, cell=cell3, pbc=(True, True, False))
        coeffs = cell_fourier_coefficients(atoms, microscope, gmax=gmax, rotation_deg=-float(detector_angle_deg))
        values = coeffs.descriptor()
        for idx, v in zip(_hk_of(coeffs.g_invA, cell_xy), values):
            k = lookup.get(tuple(idx))
            if k is not None:
                out[j, k] = v
            else:
                k = lookup.get(tuple(-idx))
                if k is not None and out[j, k] == 0:
                    out[j, k] = np.conj(v)
    return out


def _metric_mismatch(V_A: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale-free metric mismatch and scale of the observed basis ``V_A`` against template bases ``T`` (..., 2, 2),
    all at once (registration asks for every unimodular cell choice of every candidate)."""
    gi = V_A @ V_A.T
    gt = T @ np.swapaxes(T, -1, -2)
    s2 = np.trace(gi) / np.trace(gt, axis1=-2, axis2=-1)
    diff = gi / s2[..., None, None] - gt
    mismatch = np.sqrt(np.sum(diff**2, axis=(-2, -1))) / np.sqrt(np.sum(gt**2, axis=(-2, -1)))
    return mismatch, np.sqrt(s2)


def candidate_bases(motif: Motif, V_A: np.ndarray, shape_tol: float) -> list[tuple[np.ndarray, float, float]]:
    Us = unimodular_matrices(2)
    mismatch, scale = _metric_mismatch(np.asarray(V_A, dtype=float), np.stack(Us) @ motif.cell_xy)
    return [(U, float(m), float(sc)) for U, m, sc in zip(Us, mismatch, scale) if m <= shape_tol]


def hnf_matrices(det: int) -> list[np.ndarray]:
    """Hermite normal forms of determinant ``det``: every distinct sublattice of index ``det``."""
    out = []
    for a in range(1, det + 1):
        if det % a:
            continue
        d = det // a
        for b in range(d):  # rows: a·a1 + b·a2 and d·a2
            out.append(np.array([[a, b], [0, d]], dtype=float))
    return out


def lattice_options(vectors_px: np.ndarray, pixel_size_A, template, *, shape_tol: float = 0.15,
                    max_index: int = 4, scale_window: float = 1.15, calibration_window: float = 1.10,
                    tie: float = ORIENTATION_TIE) -> list[tuple[np.ndarray, np.ndarray]]:
    """The lattices, related to the measured one by an integer index ≤ ``max_index``, that the template's
    cell corresponds to (best first; usually one).

    A projection often has a finer period than the layer (atoms at different heights fill in half the
    cell; at low dose weak superstructure reflections drown and the FFT sees a √3 sub-cell), so the
    template cell may be a supercell of the measured one. Conversely weak extra reflections (a
    superstructure, or an artefact) can make the measured cell a supercell of the template's. Cells whose
    shape fits and whose size agrees with the template within ``calibration_window`` (the ±10 % calibration
    error we promise to absorb), then within ``scale_window``, are preferred in that order, smallest index
    first: a √3 cell 14 % off must not win over the 2×2 cell that fits to 1 % (C₃N₄ measured on its
    2.37 Å sub-lattice: the √3 choice left a 13 % strained template that verified at 0.74, the 2×2 fits
    at 1 %). Failing all, the measured cell itself (the
    size mismatch is then judged, and refused if implausible, when the structure is built). Returns
    [(vectors_px, N)] with the template cell matching ``N @ vectors`` (N fractional in the second case).

    Several sub-lattices of one index can fit equally well: a rectangular cell on its hexagonal sub-lattice
    (GaHO₂, 2.93 × 5.09 Å on a 2.98 Å hexagonal lattice) has three orientations, told apart only by the weak
    superstructure reflections, not by their sizes (those differ by the noise in the measured lattice). Every
    option of the best rank whose size agrees with the best one's within ``tie`` (relative) is returned, best
    first; ``reconstruct`` registers each and keeps the one the image agrees with. Picking by size alone put
    GaHO₂'s O columns 0.2–0.4 Å off in all six of its benchmark images (right formula, 0.8 eV/atom energy error).
    """
    from ..lattice.measure import reduce_basis

    motif = template if isinstance(template, Motif) else motif_from_atoms(template)
    V = np.asarray(vectors_px, dtype=float)
    px = np.asarray(pixel_size_A, dtype=float)[None, :]
    options = []

    # sub-lattices of the measured cell (template larger) first, then super-lattices (the measured cell
    # holds several template cells: weak extra reflections from a superstructure or simulation artefact)
    for kind, dets in ((0, range(1, max_index + 1)), (1, range(2, max_index + 1))):
        for det in dets:
            for N0 in hnf_matrices(det):
                N0 = N0 if kind == 0 else np.linalg.inv(N0.T)  # column-style HNF enumerates super-lattices
                N = reduce_basis((N0 @ V) * px).astype(float) @ N0  # reduced basis of the new lattice
                bases = candidate_bases(motif, (N @ V) * px, shape_tol)
                if bases:
                    scale = min((b[2] for b in bases), key=lambda x: abs(np.log(x)))
                    options.append((kind, det, abs(float(np.log(scale))), N))
    inside = [o for o in options if o[2] <= np.log(scale_window)]
    if not inside:
        return [(V, np.eye(2))]
    tight = np.log(calibration_window)

    def rank(o):
        return o[2] > tight, o[0], o[1]

    best = min(inside, key=lambda o: (*rank(o), o[2]))
    ties = sorted((o for o in inside if rank(o) == rank(best) and o[2] <= best[2] + tie), key=lambda o: o[2])
    return [(N @ V, N) for *_, N in ties]


def best_registration(image, options, template, *, resolution_A: float, **register_kw):
    """Register ``template`` on each candidate lattice (``lattice_options``: equally sized orientations of its cell on
    the measured sub-lattice) and keep the one whose weak reflections the image shows (highest registration score).
    Returns (registration, cell average, lattice vectors px, relation N, seconds spent averaging, registering)."""
    from .cellavg import cell_average

    best, t_cell, t_reg = None, 0.0, 0.0
    for V_px, relation in options:
        t0 = time.perf_counter()
        cell = cell_average(image, V_px, resolution_A=resolution_A)
        t1 = time.perf_counter()
        reg = register(cell, image.pixel_size_A, image.microscope, template, resolution_A=resolution_A,
                       detector_angle_deg=image.detector_angle_deg, **register_kw)
        t_cell, t_reg = t_cell + t1 - t0, t_reg + time.perf_counter() - t1
        if best is None or reg.score > best[0].score:
            best = (reg, cell, V_px, relation)
    return (*best, t_cell, t_reg)


def _phases(hk: np.ndarray, frac: np.ndarray) -> np.ndarray:
    return np.exp(-2j * np.pi * (frac @ hk.T.astype(float)))


def _best_shift(obs: np.ndarray, model: np.ndarray, hk: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Origin shift maximising the weighted normalised correlation of two coefficient sets."""
    g = np.arange(SHIFT_GRID) / SHIFT_GRID
    S = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    cross = weights * obs * np.conj(model)
    # the phase of (h, k) at shift (s₁, s₂) factorises: the whole grid is one (grid × n) @ (n × grid) product
    eh = np.exp(2j * np.pi * g[:, None] * hk[:, 0].astype(float)[None, :])
    ek = np.exp(2j * np.pi * g[:, None] * hk[:, 1].astype(float)[None, :])
    corr = np.real((eh * cross[None, :]) @ ek.T).ravel()  # row-major (s₁, s₂), as S
    norm = np.sqrt(np.sum(weights * np.abs(obs) ** 2) * np.sum(weights * np.abs(model) ** 2)) + 1e-30
    i = int(np.argmax(corr))

    def neg(s):
        return -float(np.real(np.exp(2j * np.pi * (s @ hk.T.astype(float))) @ cross))

    res = optimize.minimize(neg, S[i], method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-12})
    return np.mod(res.x, 1.0), float(-res.fun / norm)


def register(cell: CellAverage, pixel_size_A, microscope: Microscope, template, *, shape_tol: float = 0.15,
             resolution_A: float = 0.6, refine: bool = True, detector_angle_deg: float = 0.0) -> Registration:
    """Best correspondence of ``template`` (ASE Atoms or Motif) with the observed average cell
    (``detector_angle_deg``: ``StemImage.detector_angle_deg``, for segmented detectors)."""
    motif0 = template if isinstance(template, Motif) else motif_from_atoms(template)
    V_A = cell.vectors_px * np.asarray(pixel_size_A, dtype=float)[None, :]
    bases = candidate_bases(motif0, V_A, shape_tol)
    if not bases:
        raise NoCandidate(
            f"the template cell of {motif0.formula} ({_cellpar(motif0.cell_xy)}) is not compatible with the "
            f"measured cell ({_cellpar(V_A)})"
        )
    hk = cell.hk
    weights = 1.0 / np.maximum(cell.sigma, 1e-30) ** 2
    gmax = 1.0 / resolution_A
    best = None
    seen = []
    for U, mismatch, scale in bases:
        motif = motif0.with_basis(U)
        # the same columns at the same places (species included) is the same correspondence
        key = tuple(sorted((c.label, *np.round(np.mod(c.frac, 1.0), 3) % 1.0) for c in motif.columns))
        if key in seen:
            continue
        seen.append(key)
        frame = image_frame(motif, V_A) if microscope.mode in ("idpc", "dpc") else None
        per_col = _column_coefficients(motif, microscope, hk, gmax, frame, detector_angle_deg)
        frac0 = np.array([c.frac for c in motif.columns])
        model = np.sum(per_col * _phases(hk, frac0), axis=0)
        shift, score = _best_shift(cell.coeffs, model, hk, weights)
        if best is None or score > best[0] + 1e-9:
            best = (score, U, mismatch, scale, motif, per_col, frac0, shift)
    score, U, mismatch, scale, motif, per_col, frac0, shift = best
    frac = np.mod(frac0 + shift, 1.0)
    n = len(frac)
    if not refine:
        return Registration(motif, U, mismatch, scale, shift, frac, np.zeros_like(frac), np.ones(n), 0.0, score,
                            score**2, per_col)
    return _refine(cell, motif, U, mismatch, scale, shift, per_col, frac, score, V_A)


def _refine(cell, motif, U, mismatch, scale, shift, per_col, frac, score, V_A) -> Registration:
    hk = cell.hk.astype(float)
    obs = cell.coeffs
    w = 1.0 / np.maximum(cell.sigma, 1e-30)
    g2 = np.sum((hk @ np.linalg.inv(V_A).T) ** 2, axis=1)
    n = len(frac)
    base_phase = per_col  # coefficient of column j at its own origin

    def model(p):
        d = p[: 2 * n].reshape(n, 2)
        amp = p[2 * n : 3 * n]
        blur = p[3 * n]
        ph = np.exp(-2j * np.pi * ((frac + d) @ hk.T))
        return np.exp(-2 * np.pi**2 * blur**2 * g2) * np.sum(amp[:, None] * base_phase * ph, axis=0)

    def residuals(p):
        r = (model(p) - obs) * w
        d = p[: 2 * n].reshape(n, 2)
        gauge = 1e3 * np.sqrt(np.sum(w**2 * np.abs(obs) ** 2)) * d.mean(axis=0)
        prior = np.concatenate([(d @ V_A).ravel() / POSITION_PRIOR_A,
                                (p[2 * n : 3 * n] - a0) / (INTENSITY_PRIOR * abs(a0) + 1e-30)])
        return np.concatenate([r.real, r.imag, gauge, prior])

    # initial amplitude: one global scale from linear least squares
    m0 = model(np.concatenate([np.zeros(2 * n), np.ones(n), [0.0]]))
    a0 = float(np.real(np.vdot(m0 * w, obs * w)) / max(np.real(np.vdot(m0 * w, m0 * w)), 1e-30))
    p0 = np.concatenate([np.zeros(2 * n), np.full(n, a0), [0.05]])
    lo = np.concatenate([np.full(2 * n, -0.2), np.full(n, -np.inf), [0.0]])
    hi = np.concatenate([np.full(2 * n, 0.2), np.full(n, np.inf), [2.0]])
    if a0 < 0:
        lo[2 * n : 3 * n], hi[2 * n : 3 * n] = -np.inf, 0.0
    else:
        lo[2 * n : 3 * n], hi[2 * n : 3 * n] = 0.0, np.inf
    p0[2 * n : 3 * n] = np.clip(p0[2 * n : 3 * n], lo[2 * n : 3 * n] + 1e-12, hi[2 * n : 3 * n] - 1e-12)
    res = optimize.least_squares(residuals, p0, bounds=(lo, hi), x_scale="jac", max_nfev=400)
    p = res.x
    d = p[: 2 * n].reshape(n, 2)
    resid = (model(p) - obs) * w
    r2 = 1.0 - float(np.sum(np.abs(resid) ** 2) / max(np.sum(np.abs(obs * w) ** 2), 1e-30))
    dof = max(2 * len(obs) - len(p), 1)
    s2 = float(np.sum(res.fun[: 2 * len(obs)] ** 2) / dof)  # data residuals only (not the gauge and prior rows)
    try:
        cov = np.linalg.pinv(res.jac.T @ res.jac) * s2
        sig = np.sqrt(np.clip(np.diag(cov)[: 2 * n], 0, None)).reshape(n, 2)
    except np.linalg.LinAlgError:  # pragma: no cover - degenerate Jacobian
        sig = np.full((n, 2), np.nan)
    amp = p[2 * n : 3 * n]
    rel = amp / (np.median(np.abs(amp)) if np.median(np.abs(amp)) > 0 else 1.0)
    return Registration(motif, U, mismatch, scale, shift, np.mod(frac + d, 1.0), sig, rel, float(p[3 * n]), score, r2,
                        per_col)


def _cellpar(cell_xy: np.ndarray) -> str:
    a, b = np.linalg.norm(cell_xy, axis=1)
    gamma = np.degrees(np.arccos(np.clip(np.dot(cell_xy[0], cell_xy[1]) / (a * b), -1, 1)))
    return f"a={a:.2f} Å, b={b:.2f} Å, γ={gamma:.1f}°"
