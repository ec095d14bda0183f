"""AutoMat-style baseline: histogram of pairwise blob distances, nearest template by L2.

This is the reference the retrieval is compared with in ``benchmarks/retrieval.py``: blobs (local maxima
of the smoothed image) → all pairwise distances up to ``r_max`` → a normalised histogram; templates give
the same histogram from their projected columns (atoms within 0.3 Å in xy merged). It is rotation- and
translation-invariant but uses the nominal pixel size directly (a calibration error shifts every peak)
and ignores column contrast, which is what the Fourier-amplitude retrieval improves on.
"""

from __future__ import annotations

import numpy as np

from ..imaging.image import StemImage

__all__ = ["BlobHistogramBaseline", "blob_distance_histogram", "template_distance_histogram"]

R_MAX = 8.0
BIN = 0.1


def _hist(d: np.ndarray, n_centres: int) -> np.ndarray:
    edges = np.arange(0.0, R_MAX + BIN, BIN)
    h, _ = np.histogram(d[(d > 0.5) & (d <= R_MAX)], bins=edges)
    h = h.astype(float) / max(n_centres, 1)
    # smooth (blob positions are uncertain by ~0.1 Å) and normalise by the shell area so large r does not dominate
    from scipy.ndimage import gaussian_filter1d

    h = gaussian_filter1d(h, 1.5)
    r = 0.5 * (edges[1:] + edges[:-1])
    h = h / r
    n = np.linalg.norm(h)
    return h / n if n > 0 else h


def blob_distance_histogram(image: StemImage, sigma_A: float = 0.35) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max

    px = float(np.mean(image.pixel_size_A))
    data = np.asarray(image.data, dtype=float)
    sm = gaussian_filter(data, sigma_A / px)
    sm = (sm - sm.mean()) / (sm.std() + 1e-12)
    pk = peak_local_max(sm, min_distance=max(1, int(round(0.9 / px))), threshold_abs=0.3, exclude_border=2)
    pos = pk[:, ::-1] * np.array([image.pixel_size_A[1], image.pixel_size_A[0]])
    ny, nx = data.shape
    centre = np.array([nx * image.pixel_size_A[1], ny * image.pixel_size_A[0]]) / 2
    inner = np.all(np.abs(pos - centre) <= centre - R_MAX, axis=1)
    if inner.sum() < 3:
        inner = np.ones(len(pos), dtype=bool)
    d = np.linalg.norm(pos[inner][:, None] - pos[None], axis=-1)
    return _hist(d.ravel(), int(inner.sum()))


def template_distance_histogram(atoms) -> np.ndarray:
    cell = np.asarray(atoms.cell[:2, :2], dtype=float)
    xy = atoms.positions[:, :2]
    cols = []
    for p in xy:
        if not any(np.linalg.norm(p - q) < 0.3 for q in cols):
            cols.append(p)
    cols = np.array(cols)
    n = int(np.ceil(R_MAX / min(np.linalg.norm(cell, axis=1)))) + 1
    shifts = np.array([i * cell[0] + j * cell[1] for i in range(-n, n + 1) for j in range(-n, n + 1)])
    allc = (cols[None] + shifts[:, None]).reshape(-1, 2)
    d = np.linalg.norm(cols[:, None] - allc[None], axis=-1)
    return _hist(d.ravel(), len(cols))


class BlobHistogramBaseline:
    def __init__(self, hists: np.ndarray, indices: np.ndarray):
        self.hists = hists
        self.indices = indices

    @classmethod
    def from_library(cls, library) -> "BlobHistogramBaseline":
        h = np.array([template_distance_histogram(library.atoms(i)) for i in range(len(library))])
        return cls(h, np.arange(len(library)))

    def without(self, i: int) -> "BlobHistogramBaseline":
        keep = self.indices != i
        return BlobHistogramBaseline(self.hists[keep], self.indices[keep])

    def rank(self, image: StemImage, k: int = 5) -> list[int]:
        h = blob_distance_histogram(image)
        d = np.linalg.norm(self.hists - h[None], axis=1)
        return [int(self.indices[j]) for j in np.argsort(d)[:k]]
