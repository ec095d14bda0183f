"""Least-squares lattice from all refined columns of a field.

Why a second lattice measurement after the FFT: the FFT gives the average periodicity, the columns give
the lattice *and* its basis (sublattice offsets) with per-column residuals — what is left after the best
affine lattice is the local displacement field (strain gradients, defects, non-linear scan errors).

Model: column ``i`` of sublattice ``s`` sits at ``t_s + n1·a1 + n2·a2``. That is linear in
``(a1, a2, t_0 … t_S)``, so one linear least-squares solve per component gives the answer and its
covariance; gross outliers (mis-indexed columns, adatoms) are removed by a robust 4.5 σ (MAD) cut and the
fit repeated. Sublattices are found by clustering the fractional coordinates modulo 1.

When a ``Distortion`` is given every position (and the reference lattice) is first mapped through its
matrix, so the fitted lattice, residuals and strain are in the corrected frame — the same assumption as
``lattice.distortion`` (module doc there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..jsonable import AsDict

from ..errors import LatticeNotFound
from ..lattice.measure import cell_parameters


@dataclass(frozen=True, eq=False)
class LatticeFit(AsDict):
    """Lattice fitted to columns (Å, components ``(row, col)``, rows ``a1, a2``).

    ``strain`` is the symmetric small-strain tensor of the fitted lattice relative to ``reference``
    (the FFT lattice unless another is given), in the (row, col) frame. ``residuals_A`` is NaN for columns
    not used (rejected, edge, unassigned or outliers); ``used`` marks the others.
    """

    vectors_A: np.ndarray
    a_A: float
    b_A: float
    gamma_deg: float
    a_sigma_A: float
    b_sigma_A: float
    gamma_sigma_deg: float
    origins_A: np.ndarray
    sublattice_offsets: np.ndarray
    indices: np.ndarray
    sublattice: np.ndarray
    residuals_A: np.ndarray
    rms_residual_A: float
    used: np.ndarray
    n_used: int
    strain: np.ndarray
    distortion_corrected: bool



def _cluster_fractional(frac: np.ndarray, basis: np.ndarray, weight: np.ndarray, tol_A: float, max_sub: int):
    """Greedy clustering of fractional coordinates on the torus, strongest columns first."""
    centres: list[np.ndarray] = []
    members: list[list[int]] = []
    label = np.full(len(frac), -1)
    for i in np.argsort(-weight, kind="stable"):
        best, bd = -1, np.inf
        for k, c in enumerate(centres):
            d = frac[i] - c
            d -= np.rint(d)
            dist = float(np.linalg.norm(d @ basis))
            if dist < bd:
                best, bd = k, dist
        if best >= 0 and bd <= tol_A:
            label[i] = best
            members[best].append(i)
            # Circular mean keeps the centre on the torus.
            ang = 2 * np.pi * frac[members[best]]
            centres[best] = (np.arctan2(np.sin(ang).mean(0), np.cos(ang).mean(0)) / (2 * np.pi)) % 1.0
        elif len(centres) < 4 * max_sub:
            centres.append(frac[i].copy())
            members.append([i])
            label[i] = len(centres) - 1
    sizes = np.array([len(m) for m in members])
    keep = np.argsort(-sizes)[:max_sub]
    keep = keep[sizes[keep] >= max(3, 0.05 * len(frac))]
    remap = {int(k): j for j, k in enumerate(keep)}
    new = np.array([remap.get(int(lab), -1) for lab in label])
    return new, np.array([centres[k] for k in keep])


def fit_lattice(
    columns,
    lattice,
    *,
    distortion=None,
    reference=None,
    include_edge: bool = False,
    cluster_tol_A: float = 0.4,
    max_sublattices: int = 8,
) -> LatticeFit:
    """Fit ``a1, a2`` and one origin per sublattice to the columns (module doc).

    ``lattice`` is the starting lattice (``MeasuredLattice``); ``distortion`` an optional ``Distortion``;
    ``reference`` a ``MeasuredLattice`` or 2×2 basis in Å against which strain is reported (default: the
    starting lattice, distortion-corrected like the columns).
    """
    pos = np.asarray(columns.positions_A, dtype=float)
    t = np.eye(2) if distortion is None else np.asarray(distortion.matrix, dtype=float)
    pos = pos @ t.T
    basis0 = np.asarray(lattice.vectors_A, dtype=float) @ t.T
    if reference is None:
        ref = basis0
    elif hasattr(reference, "vectors_A"):
        ref = np.asarray(reference.vectors_A, dtype=float) @ t.T
    else:
        ref = np.asarray(reference, dtype=float)

    ok = ~columns.rejected if include_edge else columns.good
    ok = np.asarray(ok, bool).copy()
    if ok.sum() < 6:
        raise LatticeNotFound(f"only {int(ok.sum())} usable columns; at least 6 are needed to fit a lattice")
    weight = np.asarray(columns.integrated_intensity, dtype=float)
    # Anchor near the field centre so index errors do not accumulate from a corner.
    centre = np.median(pos[ok], axis=0)
    anchor = int(np.flatnonzero(ok)[np.argmin(np.linalg.norm(pos[ok] - centre, axis=1))])
    basis = basis0.copy()
    label = np.full(len(pos), -1)
    used = ok.copy()
    hk = np.zeros((len(pos), 2), dtype=np.int64)
    for _pass in range(3):
        frac = (pos - pos[anchor]) @ np.linalg.inv(basis)
        fr = frac - np.floor(frac)
        label_ok, offsets = _cluster_fractional(fr[ok], basis, weight[ok], cluster_tol_A, max_sublattices)
        label = np.full(len(pos), -1)
        label[np.flatnonzero(ok)] = label_ok
        if len(offsets) == 0:
            raise LatticeNotFound("the columns do not form a periodic arrangement on the measured lattice")
        sub = label >= 0
        hk = np.zeros((len(pos), 2), dtype=np.int64)
        hk[sub] = np.rint(frac[sub] - offsets[label[sub]]).astype(np.int64)
        used = ok & sub
        for _robust in range(3):
            idx = np.flatnonzero(used)
            x = np.zeros((len(idx), 2 + len(offsets)))
            x[:, :2] = hk[idx]
            x[np.arange(len(idx)), 2 + label[idx]] = 1.0
            sol, *_ = np.linalg.lstsq(x, pos[idx], rcond=None)
            res = pos[idx] - x @ sol
            rn = np.linalg.norm(res, axis=1)
            mad = 1.4826 * float(np.median(np.abs(rn - np.median(rn))))
            cut = float(np.median(rn)) + 4.5 * max(mad, 1e-6)
            drop = rn > max(cut, 0.05)
            if not drop.any():
                break
            used[idx[drop]] = False
        basis = sol[:2]
    idx = np.flatnonzero(used)
    x = np.zeros((len(idx), 2 + len(offsets)))
    x[:, :2] = hk[idx]
    x[np.arange(len(idx)), 2 + label[idx]] = 1.0
    sol, *_ = np.linalg.lstsq(x, pos[idx], rcond=None)
    res = pos[idx] - x @ sol
    dof = max(len(idx) - x.shape[1], 1)
    xtx_inv = np.linalg.pinv(x.T @ x)
    s2 = np.sum(res**2, axis=0) / dof  # per component (row, col)
    vec = sol[:2]
    la, lb, gam = cell_parameters(vec)

    # Covariance of (a1_r, a2_r) and (a1_c, a2_c) blocks -> a, b, gamma.
    cov4 = np.zeros((4, 4))  # order: a1_r, a1_c, a2_r, a2_c
    for comp in range(2):
        ids = [comp, 2 + comp]
        cov4[np.ix_(ids, ids)] = xtx_inv[:2, :2] * s2[comp]
    v0 = vec.ravel()
    jac = np.zeros((3, 4))
    for k in range(4):
        d = np.zeros(4)
        d[k] = 1e-7
        jac[:, k] = (np.array(cell_parameters((v0 + d).reshape(2, 2))) - np.array(cell_parameters((v0 - d).reshape(2, 2)))) / 2e-7
    sig = np.sqrt(np.maximum(np.diag(jac @ cov4 @ jac.T), 0.0))

    # Deformation F with vec_i = F ref_i  ->  F = (ref⁻¹ vec)ᵀ.
    f = (np.linalg.solve(ref, vec)).T
    strain = 0.5 * (f + f.T) - np.eye(2)

    residuals = np.full((len(pos), 2), np.nan)
    residuals[idx] = res
    origins = sol[2:]
    offsets_frac = (origins - origins[0]) @ np.linalg.inv(vec)
    offsets_frac -= np.floor(offsets_frac + 1e-9)
    return LatticeFit(
        vectors_A=vec,
        a_A=la,
        b_A=lb,
        gamma_deg=gam,
        a_sigma_A=float(sig[0]),
        b_sigma_A=float(sig[1]),
        gamma_sigma_deg=float(sig[2]),
        origins_A=origins,
        sublattice_offsets=offsets_frac,
        indices=hk,
        sublattice=np.where(used, label, -1),
        residuals_A=residuals,
        rms_residual_A=float(math.sqrt(np.mean(np.sum(res**2, axis=1)))),
        used=used,
        n_used=int(len(idx)),
        strain=strain,
        distortion_corrected=distortion is not None,
    )
