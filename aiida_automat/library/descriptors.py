"""Template descriptors: the fast-model image of one cell, as Fourier coefficients on a fixed (h, k) grid.

A periodic image *is* its Fourier series over the reciprocal lattice, so the complex coefficients
C(h, k) of the fast-model image of a template's standardised cell are both its "simulated image" (render
them with ``imaging.fastsim.render``) and the raw material of the retrieval descriptor: |C(h, k)| is
translation-invariant, and indexing by (h, k) of the template's own reduced cell makes the comparison
with an observed image rotation-invariant once the observed lattice is indexed (see ``retrieve``).

All templates share one half-grid of indices (|h|, |k| <= ``HMAX``, one of each Friedel pair, since
C(-g) = C(g)* for a real image), so the library is one dense complex array per mode and a retrieval is a
few matrix products.
"""

from __future__ import annotations

import numpy as np

from ..imaging.microscope import Microscope

__all__ = ["HMAX", "half_grid", "template_coefficients", "element_response"]

#: Largest Miller index kept per direction (covers |g| up to ~2.5 Å⁻¹ for cells up to ~3.2 Å).
HMAX = 7
#: detector orientations (deg) averaged for segmented-detector modes
DETECTOR_ANGLES = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0)


def half_grid(hmax: int = HMAX) -> np.ndarray:
    """(n, 2) integer (h, k): one of each ±(h, k) pair, (0, 0) excluded, sorted by h then k."""
    h = np.arange(-hmax, hmax + 1)
    H, K = np.meshgrid(h, h, indexing="ij")
    hk = np.stack([H.ravel(), K.ravel()], axis=1)
    keep = (hk[:, 0] > 0) | ((hk[:, 0] == 0) & (hk[:, 1] > 0))
    return hk[keep]


def template_coefficients(atoms, microscope: Microscope, hk: np.ndarray | None = None, gmax: float | None = None) -> np.ndarray:
    """Complex fast-model coefficients of the cell image at ``hk`` (zero outside the band limit/gmax).

    Units are those of ``imaging.fastsim`` (fraction of the incident beam, or its integral for iDPC), so
    templates can be compared with calibrated simulations on an absolute scale too.
    """
    from ..imaging.fastsim import cell_fourier_coefficients

    hk = half_grid() if hk is None else np.asarray(hk)
    cell = np.asarray(atoms.cell[:2, :2], dtype=float)
    recip = np.linalg.inv(cell).T
    g_need = float(np.max(np.linalg.norm(hk @ recip, axis=1))) * 1.001
    gm = g_need if gmax is None else min(g_need, float(gmax))
    lookup = {(int(h), int(k)): i for i, (h, k) in enumerate(hk)}
    # segmented (DPC) detectors are anisotropic: the amplitude of a reflection depends a little on its
    # direction relative to the segments, which the observed crystal's unknown rotation randomises, so
    # phase-contrast descriptors average |C| over detector orientations (phases from the first one).
    angles = DETECTOR_ANGLES if microscope.mode in ("idpc", "dpc") else (0.0,)
    mag = np.zeros(len(hk))
    out = np.zeros(len(hk), dtype=np.complex128)
    for n, angle in enumerate(angles):
        coeffs = cell_fourier_coefficients(atoms, microscope, gmax=gm, rotation_deg=angle)
        desc = coeffs.descriptor()
        idx = np.rint(coeffs.g_invA @ cell.T).astype(int)  # g·a_i = h_i
        for (h, k), c in zip(idx, desc):
            j = lookup.get((int(h), int(k)))
            if j is not None:
                mag[j] += abs(c) / len(angles)
                if n == 0:
                    out[j] = c
    phase = np.where(np.abs(out) > 0, out / np.where(np.abs(out) > 0, np.abs(out), 1.0), 1.0)
    return np.where(mag > 0, mag * phase, 0.0)


_RESPONSE_CACHE: dict = {}


def element_response(microscope: Microscope, g_invA: float = 0.35) -> np.ndarray:
    """Fast-model contrast of one atom of each element Z = 1..86 at spatial frequency ``g_invA``.

    This is the mode-dependent Z-scaling (≈ Z^1.6–1.8 for annular detectors, much flatter for iDPC) that
    turns fitted column weights into element proposals; index 0 is unused.
    """
    from ase import Atoms

    key = (tuple(sorted(microscope.as_dict().items())), round(float(g_invA), 4))
    if key in _RESPONSE_CACHE:
        return _RESPONSE_CACHE[key]
    from ase.data import chemical_symbols

    a = 1.0 / g_invA
    out = np.zeros(87)
    for z in range(1, 87):
        atoms = Atoms(chemical_symbols[z], positions=[[0, 0, 5]], cell=[[a, 0, 0], [0, a, 0], [0, 0, 10]], pbc=(True, True, False))
        try:
            c = template_coefficients(atoms, microscope, hk=np.array([[1, 0]]))
            out[z] = abs(c[0]) * a * a  # per atom, independent of the dummy cell area
        except Exception:  # noqa: BLE001 - elements without scattering factors
            out[z] = np.nan
    _RESPONSE_CACHE[key] = out
    return out
