"""Tiny image model for lattice/column tests: Gaussian blobs at projected atom positions.

Independent of ``imaging.fastsim`` on purpose, so lattice tests keep a ground truth they fully control
(exact column positions, exact distortion) and do not break when the simulator changes.
"""

from __future__ import annotations

import numpy as np

from aiida_automat.imaging.image import StemImage
from aiida_automat.imaging.microscope import Microscope


def mos2(a=3.18):
    from ase.build import mx2

    return mx2(formula="MoS2", kind="2H", a=a, thickness=3.19)


def projected_columns(atoms, *, tol_A=0.05):
    """Unique in-plane column positions (x, y) in Å of one cell and their Z^1.7 weight (HAADF-like)."""
    xy = atoms.positions[:, :2]
    w = atoms.numbers.astype(float) ** 1.7
    cols, weights = [], []
    for p, wi in zip(xy, w):
        for k, c in enumerate(cols):
            if np.linalg.norm(c - p) < tol_A:
                weights[k] += wi
                break
        else:
            cols.append(p.copy())
            weights.append(wi)
    return np.array(cols), np.array(weights)


def column_positions(atoms, shape, pixel_size_A, *, rotation_deg=0.0, offset_A=(0.0, 0.0), matrix=None, margin_A=3.0):
    """Columns covering the field: (row, col) positions in px, weights.

    ``matrix`` (2×2, acting on (x, y) in Å) is applied after rotation: an affine scan distortion or strain.
    """
    py, px = pixel_size_A
    ny, nx = shape
    cols, weights = projected_columns(atoms)
    cell = atoms.cell.array[:2, :2]
    th = np.radians(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    m = rot if matrix is None else np.asarray(matrix) @ rot
    fov = np.hypot(ny * py, nx * px)
    n = int(np.ceil(fov / min(np.linalg.norm(cell, axis=1)) * 1.3)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    origins = i.ravel()[:, None] * cell[0] + j.ravel()[:, None] * cell[1]
    xy = (origins[:, None, :] + cols[None, :, :]).reshape(-1, 2)
    w = np.tile(weights, len(origins))
    xy = xy @ m.T + np.array([nx * px / 2 + offset_A[0], ny * py / 2 + offset_A[1]])
    rc = np.stack([xy[:, 1] / py, xy[:, 0] / px], axis=1)
    inside = (
        (rc[:, 0] > -margin_A / py) & (rc[:, 0] < ny + margin_A / py)
        & (rc[:, 1] > -margin_A / px) & (rc[:, 1] < nx + margin_A / px)
    )
    return rc[inside], w[inside]


def render(positions_px, weights, shape, pixel_size_A, sigma_A=0.4):
    py, px = pixel_size_A
    sy, sx = sigma_A / py, sigma_A / px
    ny, nx = shape
    img = np.zeros(shape)
    hy, hx = int(np.ceil(4 * sy)), int(np.ceil(4 * sx))
    oy, ox = np.arange(-hy, hy + 1), np.arange(-hx, hx + 1)
    for (r, c), w in zip(positions_px, weights):
        r0, c0 = int(round(r)), int(round(c))
        rr, cc = r0 + oy, c0 + ox
        gy = np.exp(-0.5 * ((rr - r) / sy) ** 2)
        gx = np.exp(-0.5 * ((cc - c) / sx) ** 2)
        vr, vc = (rr >= 0) & (rr < ny), (cc >= 0) & (cc < nx)
        if vr.any() and vc.any():
            img[np.ix_(rr[vr], cc[vc])] += w * np.outer(gy[vr], gx[vc])
    return img


def blob_image(
    atoms=None,
    *,
    shape=(256, 256),
    pixel_size_A=0.1,
    rotation_deg=0.0,
    offset_A=(0.0, 0.0),
    matrix=None,
    sigma_A=0.4,
    dose_e_per_A2=None,
    rng=None,
    background=0.05,
    dark=False,
    claimed_pixel_size_A=None,
    mode="haadf",
):
    """A StemImage of ``atoms`` and the true column positions (px, (row, col)) and weights."""
    atoms = mos2() if atoms is None else atoms
    pix = np.broadcast_to(np.asarray(pixel_size_A, dtype=float), (2,))
    pos, w = column_positions(atoms, shape, tuple(pix), rotation_deg=rotation_deg, offset_A=offset_A, matrix=matrix)
    img = render(pos, w / w.max(), shape, tuple(pix), sigma_A=sigma_A) + background
    if dose_e_per_A2 is not None:
        rng = np.random.default_rng(0) if rng is None else rng
        # Mean counts per pixel: dose × pixel area, shared between the (normalised) signal levels.
        lam = img / img.mean() * dose_e_per_A2 * pix[0] * pix[1] * 0.05
        img = rng.poisson(lam).astype(float)
    if dark:
        img = img.max() - img
    claimed = tuple(pix) if claimed_pixel_size_A is None else claimed_pixel_size_A
    return StemImage(img, claimed, microscope=Microscope(mode=mode), dose_e_per_A2=dose_e_per_A2), pos, w


def random_blob_image(*, shape=(256, 256), pixel_size_A=0.1, n=1500, sigma_A=0.4, rng=None):
    """Amorphous-like image: blobs at random positions with a hard-core distance (a liquid, no lattice)."""
    rng = np.random.default_rng(1) if rng is None else rng
    ny, nx = shape
    pts = []
    dmin = 1.6 / pixel_size_A
    tries = 0
    while len(pts) < n and tries < 50 * n:
        p = rng.uniform((0, 0), (ny, nx))
        tries += 1
        if pts and np.min(np.hypot(*(np.array(pts) - p).T)) < dmin:
            continue
        pts.append(p)
    pts = np.array(pts)
    img = render(pts, rng.uniform(0.4, 1.0, len(pts)), shape, (pixel_size_A, pixel_size_A), sigma_A=sigma_A)
    return StemImage(img + 0.05, pixel_size_A)
