"""Measure the 2D lattice of an image from its Fourier transform.

Why the FFT and not the columns: Bragg peaks integrate over every cell in the field, so the lattice is
known before (and independently of) any column is found; it sets the column search scale and makes a
wrong pixel size visible. The steps are deliberately the ones a microscopist would do by hand:

1. Hann window (the field never holds an integer number of cells), power spectrum.
2. Noise floor per ring of |k| (median / ln 2), so "SNR" means *power over the local mean background*;
   for pure noise this ratio is Exp(1)-distributed, which turns the detection threshold into a false-alarm
   probability (``ln(#pixels) + 12``: about one false peak in 10⁵ images).
   A lattice none of whose reflections passes alone (graphene at 2·10³ e⁻/Å²) is searched for jointly: every
   pair of candidate peaks is a lattice hypothesis tested on the power at its other points, at the same overall
   false-alarm rate (``_weak_lattice_peaks``).
3. Basis: the pair of strong peaks that indexes the most (SNR-weighted) peaks; among equally good pairs
   the one with the largest reciprocal cell (smallest real cell), then Gauss reduction. When no pair of
   peaks indexes all the strong ones (a cell with a long axis whose first orders are weak, so only
   combinations like (1,2), (0,5), (2,-3) are seen), the basis is the real-space cell in which all
   strong peaks are in phase — the lattice the peaks generate — before weaker pairs are accepted.
4. Every indexed peak is refined to a small fraction of a bin on the continuous DTFT — jointly, each on
   the spectrum minus the model of its neighbours (``fft.refine_peaks``) — and both basis vectors are
   least-squares fitted to *all* of them (a 3rd-order peak carries 3× the leverage), weighted by the
   calibrated position variance 0.25/SNR bins²; the uncertainties never fall below what that predicts.

Conventions: vectors are rows ``a1, a2``; components are ``(row, col)`` = ``(y, x)``, in pixels or Å
(Å via the image's claimed pixel size, per axis). Reduced cell: ``|a1| <= |a2|``, ``gamma >= 90°`` (the
hexagonal setting is 120°), ``a1`` points to ``+col``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..jsonable import AsDict
from scipy import ndimage

from ..errors import LatticeNotFound
from ..imaging.image import StemImage
from .fft import frequency_grids, radial_background, refine_peak, refine_peaks, windowed

_LINE_MEDIAN_BINS = 31
_MAX_REFINED = 40
_POS_FLOOR_BINS2 = 1e-4  # systematic peak-position floor (0.01 bin)²
#: per-axis variance (bins²) of a refined Hann-windowed peak × its power SNR, measured on synthetic tones in
#: white noise (0.19–0.28 for SNR 20–660): the statistical position error is √(0.25 / SNR) bins
_POS_VAR_SNR = 0.25
#: refined peaks further from the chosen lattice than this (mean squared residual / expected variance) make
#: the lattice suspect: the lattice the refined peaks generate is tried as well (``measure_lattice``)
_CHI2_SUSPECT = 10.0
_CHI2_GAIN = 3.0  # ... and replaced by one that explains the refined peaks this much better


@dataclass(frozen=True, eq=False)
class MeasuredLattice(AsDict):
    """The lattice present in an image, with how sure we are of it.

    ``peak_snrs`` are power ratios over the mean noise power at the same |k|; ``peak_snr`` is the largest.
    ``periodicity`` is the fraction of spectral power (in the searched |k| band, background removed) that
    sits on the lattice's Bragg positions: ~0 for amorphous material, ~0.3–0.9 for a clean crystal.
    Uncertainties are statistical (from the scatter of the peaks about the fitted lattice), in the
    image's claimed calibration — they do not include a calibration error.
    """

    vectors_px: np.ndarray
    vectors_A: np.ndarray
    reciprocal_px: np.ndarray
    a_A: float
    b_A: float
    gamma_deg: float
    a_sigma_A: float
    b_sigma_A: float
    gamma_sigma_deg: float
    rotation_deg: float
    pixel_size_A: tuple[float, float]
    shape: tuple[int, int]
    peak_snr: float
    n_indexed: int
    periodicity: float
    peaks_px: np.ndarray
    peak_indices: np.ndarray
    peak_snrs: np.ndarray
    residual_rms_bins: float

    @property
    def area_A2(self) -> float:
        return float(abs(np.linalg.det(self.vectors_A)))

    @property
    def reciprocal_A(self) -> np.ndarray:
        """Reciprocal basis in cycles/Å, (row, col) components, ``a_i · g_j = δ_ij``."""
        return np.linalg.inv(self.vectors_A).T

    @property
    def min_spacing_A(self) -> float:
        """Shortest lattice-plane spacing among the basis directions (d of the strongest first order)."""
        return float(1.0 / np.max(np.linalg.norm(self.reciprocal_A, axis=1)))



def cell_parameters(vectors: np.ndarray) -> tuple[float, float, float]:
    a1, a2 = np.asarray(vectors, dtype=float)
    la, lb = float(np.linalg.norm(a1)), float(np.linalg.norm(a2))
    cosg = float(np.clip(np.dot(a1, a2) / (la * lb), -1.0, 1.0))
    return la, lb, math.degrees(math.acos(cosg))


def reduce_basis(vectors_A: np.ndarray) -> np.ndarray:
    """Integer matrix ``M`` such that ``M @ vectors_A`` is the reduced cell (convention in module doc)."""
    vec = np.asarray(vectors_A, dtype=float).copy()
    m = np.eye(2, dtype=np.int64)
    for _ in range(100):
        if np.dot(vec[1], vec[1]) < np.dot(vec[0], vec[0]):
            vec = vec[::-1].copy()
            m = m[::-1].copy()
        mu = int(round(np.dot(vec[0], vec[1]) / np.dot(vec[0], vec[0])))
        if mu == 0:
            break
        vec[1] -= mu * vec[0]
        m[1] -= mu * m[0]
    if np.dot(vec[0], vec[1]) > 1e-12 * np.dot(vec[0], vec[0]):
        vec[1] *= -1
        m[1] *= -1
    if vec[0][1] < -1e-12 or (abs(vec[0][1]) <= 1e-12 and vec[0][0] < 0):
        vec *= -1
        m *= -1
    return m


def _snr_map(fw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Power, mean background and their ratio; axis lines get a line background too.

    Scan-line jitter and row/column intensity drift put a streak of power along the spectrum's axes that
    the ring median does not see; a running median *along* those lines keeps a Bragg peak that lies on
    an axis (a lattice aligned with the scan) while flattening the streak.
    """
    power = np.abs(np.fft.fft2(fw)) ** 2
    bg = radial_background(power)
    ln2 = np.log(2.0)
    for j in (-1, 0, 1):
        line = ndimage.median_filter(power[:, j], size=_LINE_MEDIAN_BINS, mode="wrap") / ln2
        bg[:, j] = np.maximum(bg[:, j], line)
    for i in (-1, 0, 1):
        line = ndimage.median_filter(power[i, :], size=_LINE_MEDIAN_BINS, mode="wrap") / ln2
        bg[i, :] = np.maximum(bg[i, :], line)
    bg = np.maximum(bg, 1e-300)
    return power, bg, power / bg


def _band_mask(shape, pixel_size_A, min_spacing_A, max_spacing_A) -> np.ndarray:
    ny, nx = shape
    kr, kc = frequency_grids(shape)
    q = np.hypot(kr / pixel_size_A[0], kc / pixel_size_A[1])
    rbins = np.hypot(kr * ny, kc * nx)
    return (
        (q >= 1.0 / max_spacing_A)
        & (q <= 1.0 / min_spacing_A)
        & (np.abs(kr) <= 0.45)
        & (np.abs(kc) <= 0.45)
        & (rbins >= 2.5)
    )


def _index(points_bins: np.ndarray, g_bins: np.ndarray, max_order: int, tol_bins: float = 0.35, tol_index: float = 0.12):
    """Miller indices of points on the lattice ``g_bins`` (rows) and which points are on it.

    The absolute tolerance grows with the order because the basis error is multiplied by the index.
    """
    hk = points_bins @ np.linalg.inv(g_bins)
    hk_round = np.rint(hk)
    resid = np.linalg.norm(points_bins - hk_round @ g_bins, axis=1)
    order = np.max(np.abs(hk_round), axis=1)
    ok = (
        (resid <= tol_bins + 0.08 * order)
        & (np.max(np.abs(hk - hk_round), axis=1) <= tol_index)
        & (order <= max_order)
        & (order > 0)
    )
    return hk_round.astype(np.int64), ok, resid


#: weak-lattice search (``_weak_lattice_peaks``): candidate basis peaks are local maxima above this power ratio
#: (noise: ~e⁻⁶ of the bins), at most ``_WEAK_CANDIDATES`` of them, and lattice points up to ``_WEAK_ORDER``
_WEAK_CANDIDATE_RATIO = 6.0
_WEAK_CANDIDATES = 24
_WEAK_ORDER = 4
_WEAK_REFINEMENTS = 3  # finer lattices tried in turn after the best pair
_WEAK_MIN_SPACING_BINS = 3.0


def _weak_lattice_peaks(ratio: np.ndarray, candidates: np.ndarray, band: np.ndarray, kr_bins: np.ndarray,
                        kc_bins: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Peaks of a lattice none (or only one) of whose reflections passes the single-peak threshold ``thr``, but
    whose reflections together are far above the noise: graphene at 5·10³ e⁻/Å² shows its six first orders at
    15–24× the background, where one peak needs ~20× to be told from the largest of 10⁴ noise bins.

    Every pair of candidate peaks (local maxima above ``_WEAK_CANDIDATE_RATIO``, not collinear) is a lattice
    hypothesis, tested on the power at its *other* points (not the pair itself, which was selected for being
    high): each point's largest ratio in its 3×3 bins, turned into its noise-only Exp(1) equivalent, summed in
    order of |g| and compared with the Gamma tail of that many points. The best hypothesis is accepted when its
    tail probability, times the number of hypotheses and of partial sums tried, is below e⁻¹² — the single-peak
    test's false-alarm rate — so pure noise still finds no lattice. Returns the accepted lattice's peaks (local
    maxima above the candidate level next to its points: rows, columns, and their indices in the pair's basis),
    else nothing.
    """
    from scipy.special import gammaincc

    from ..reconstruct.registration import hnf_matrices

    ci, cj = np.nonzero(candidates & (ratio > _WEAK_CANDIDATE_RATIO))
    none = (np.zeros(0, dtype=int), np.zeros(0, dtype=int), None)
    if len(ci) < 2:
        return none
    top = np.argsort(-ratio[ci, cj])[:_WEAK_CANDIDATES]
    ci, cj = ci[top], cj[top]
    g = np.stack([kr_bins[ci, cj], kc_bins[ci, cj]], axis=1)
    ny, nx = ratio.shape
    local = ndimage.maximum_filter(ratio, size=3, mode="wrap")
    # P(max of 9 Exp(1) > x) = 1 − (1 − e⁻ˣ)⁹, as the Exp(1) variable with the same tail
    u = -np.log(np.clip(-np.expm1(9.0 * np.log1p(-np.exp(-np.clip(local, 1e-12, 700.0)))), 1e-300, 1.0))
    h = np.arange(-_WEAK_ORDER, _WEAK_ORDER + 1)
    H, K = (x.ravel() for x in np.meshgrid(h, h, indexing="ij"))
    half_hk = (H > 0) | ((H == 0) & (K > 0))
    H, K = H[half_hk], K[half_hk]

    def tail(basis: np.ndarray, skip) -> tuple[float, int]:
        """Smallest log Gamma tail over the partial sums (by |g|) of the points of ``basis`` not in ``skip``."""
        pts = H[:, None] * basis[0] + K[:, None] * basis[1]
        r, c = np.rint(pts[:, 0]).astype(int) % ny, np.rint(pts[:, 1]).astype(int) % nx
        inside = band[r, c] & ~skip(pts)
        if not inside.any():
            return 0.0, 0
        x = np.cumsum(u[r[inside], c[inside]][np.argsort(np.hypot(pts[inside, 0], pts[inside, 1]))])
        m = np.arange(1, len(x) + 1)
        return float(np.min(np.log(np.clip(gammaincc(m, x), 1e-300, 1.0)))), len(x)  # P(Gamma(m, 1) > x)

    def on(basis):
        inv = np.linalg.inv(basis)
        return lambda pts: np.all(np.abs(pts @ inv - np.rint(pts @ inv)) < 1e-6, axis=1)

    def the_pair(_pts):  # a hypothesis's own two peaks, (1, 0) and (0, 1), were chosen for being high
        return ((H == 1) & (K == 0)) | ((H == 0) & (K == 1))

    pairs = [(a, b) for a in range(len(g)) for b in range(a + 1, len(g))
             if abs(g[a, 0] * g[b, 1] - g[a, 1] * g[b, 0])
             >= math.sin(math.radians(15.0)) * np.linalg.norm(g[a]) * np.linalg.norm(g[b])]
    best, basis, tries = 0.0, None, 0
    for a, b in pairs:
        pair = g[[a, b]]
        lt, n = tail(pair, the_pair)
        tries += n
        if lt < best:
            best, basis = lt, pair
    limit = -(thr - math.log(max(int(band.sum()), 2)))  # e⁻¹² in all, as for one peak
    if basis is None or best + math.log(max(tries, 1)) > limit:
        return none
    # The pair may span a sub-lattice of the reflections (two strong second orders, the first orders too weak to
    # be candidates): a finer reciprocal lattice is taken when its *additional* points stand out the same way.
    def spacing(b):  # the finer lattice's closest points must be resolved by the 3×3 sampling
        return min(np.linalg.norm(v) for v in (b[0], b[1], b[0] + b[1], b[0] - b[1]))

    for _ in range(_WEAK_REFINEMENTS):
        finer = [f for f in (np.linalg.inv(m) @ basis for n in (2, 3, 4) for m in hnf_matrices(n))
                 if spacing(f) >= _WEAK_MIN_SPACING_BINS]
        if not finer:
            break
        scored = [(tail(f, on(basis)), f) for f in finer]
        n_tried = sum(n for (_, n), _ in scored)
        (lt, _), f = min(scored, key=lambda t: t[0][0])
        if lt + math.log(max(n_tried, 1)) > limit:
            break
        basis = f
    hk = np.stack([H, K], axis=1)
    pts = hk[:, :1] * basis[0] + hk[:, 1:] * basis[1]
    flip = (pts[:, 0] < 0) | ((pts[:, 0] == 0) & (pts[:, 1] < 0))  # the Friedel mate in the searched half
    pts[flip] *= -1.0
    hk[flip] *= -1
    r, c = np.rint(pts[:, 0]).astype(int) % ny, np.rint(pts[:, 1]).astype(int) % nx
    # the accepted lattice's own peaks: the local maximum of the power next to each point, if it stands out
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for rr, cc, idx in zip(r, c, hk):
        if not band[rr, cc]:
            continue
        win_r, win_c = np.arange(rr - 1, rr + 2) % ny, np.arange(cc - 1, cc + 2) % nx
        sub = ratio[np.ix_(win_r, win_c)]
        i, j = np.unravel_index(int(np.argmax(sub)), sub.shape)
        if sub[i, j] > _WEAK_CANDIDATE_RATIO and candidates[win_r[i], win_c[j]]:
            found.setdefault((int(win_r[i]), int(win_c[j])), (int(idx[0]), int(idx[1])))
    if len(found) < 3 or np.linalg.matrix_rank(np.array(list(found.values()), dtype=float)) < 2:
        return none
    rows_cols = np.array(list(found.keys()))
    return rows_cols[:, 0], rows_cols[:, 1], np.array(list(found.values()))


def _choose_basis(pts_bins: np.ndarray, snr: np.ndarray, fw: np.ndarray | None = None,
                  max_len_px: float = 0.0) -> np.ndarray | None:
    """The two shortest non-collinear peaks that index the strongest peaks (module doc, step 3).

    Candidates are all detected peaks, so a weak but genuine first order still wins over a strong second
    order (a noise-free HAADF image of MoS2 has its (110) stronger than its (100) after the ring
    normalisation). The index test is relative as well as absolute so that a spurious short vector cannot
    "index" everything within the tolerance.
    """
    n = len(pts_bins)
    strong = np.argsort(-snr)[: min(8, n)]
    lengths = np.linalg.norm(pts_bins, axis=1)
    ii, jj = np.triu_indices(n, 1)
    sin = np.abs(pts_bins[ii, 0] * pts_bins[jj, 1] - pts_bins[ii, 1] * pts_bins[jj, 0]) / (lengths[ii] * lengths[jj])
    ok_pair = sin >= math.sin(math.radians(15.0))
    ii, jj = ii[ok_pair], jj[ok_pair]
    order = np.lexsort((-(np.abs(sin[ok_pair])), lengths[ii] + lengths[jj]))
    if len(ii) == 0:
        return None

    def first(need):
        for k in order:
            g = pts_bins[[ii[k], jj[k]]]
            _, ok, _ = _index(pts_bins[strong], g, max_order=6)
            if ok.mean() >= need - 1e-9:
                return g
        return None

    g = first(1.0)
    if g is None and fw is not None:
        ny, nx = fw.shape
        fine = np.array([refine_peak(fw, (p[0] / ny, p[1] / nx))[:2] for p in pts_bins[strong]]) * [ny, nx]
        g = _generated_basis(fine, fw.shape, max_len_px)
    for need in (0.85, 0.7):
        if g is None:
            g = first(need)
    return g


def _generated_basis(pts_bins: np.ndarray, shape: tuple[int, int], max_len_px: float, tol: float = 0.12,
                     tol_bins: float = 0.3, *, all_bases: bool = False, max_bases: int = 6):
    """Reciprocal basis (bins) of the lattice generated by refined peaks ``pts_bins``, None if there is none.

    Why real space: the peaks generate the lattice, but its basis vectors need not be among them (nor among
    their differences), whereas a real-space lattice vector ``r`` is simply one with every ``k·r`` an
    integer. ``mean cos 2πk·r`` on an integer-pixel grid has its maxima near such ``r``; each is refined by
    least squares on the rounded phases and kept if every peak is within ``tol`` cycles of an integer and
    the miss, read as a peak-position error along ``r``, is below ``tol_bins``.
    Pairs of survivors are tried smallest cell first, and the first whose reciprocal lattice, fitted to the
    peaks, leaves none further than ``tol_bins`` away wins: a phase tolerance alone lets a few peaks fit a
    too small cell by coincidence (its large reciprocal cell turns a 0.1-cycle miss into half a bin).
    ``all_bases``: every passing lattice instead (distinct lattices, smallest cell first, at most
    ``max_bases``), for the caller to compare fits.
    """
    ny, nx = shape
    to_bins = np.array([ny, nx], dtype=float)
    k = pts_bins / to_bins  # cycles/px
    rmax = int(math.ceil(max_len_px))
    rr, cc = np.meshgrid(np.arange(-rmax, rmax + 1), np.arange(0, rmax + 1), indexing="ij")
    score = np.mean(np.cos(2 * np.pi * (rr[..., None] * k[:, 0] + cc[..., None] * k[:, 1])), axis=-1)
    score[(cc == 0) & (rr <= 0)] = -1.0  # half-plane: r and -r are the same lattice vector
    peaks = (score == ndimage.maximum_filter(score, size=3, mode="nearest")) & (score > 0.5)
    peaks &= np.hypot(rr, cc) >= 2.0
    found: list[np.ndarray] = []
    for r0 in np.stack([rr[peaks], cc[peaks]], axis=1).astype(float):
        n = np.rint(k @ r0)
        r = np.linalg.lstsq(k, n, rcond=None)[0]
        miss = np.max(np.abs(k @ r - n))
        # the miss as a peak-position error (bins) along r: a short r fits any peaks to a fraction of a cycle
        if miss <= tol and miss * max(ny, nx) <= tol_bins * np.linalg.norm(r) and np.linalg.norm(r) <= max_len_px:
            found.append(r)
    if len(found) < 2:
        return [] if all_bases else None
    out: list[np.ndarray] = []
    vec = np.array(found)
    ii, jj = np.triu_indices(len(vec), 1)
    area = np.abs(vec[ii, 0] * vec[jj, 1] - vec[ii, 1] * vec[jj, 0])
    lens = np.linalg.norm(vec, axis=1)
    ok = area >= 0.05 * lens[ii] * lens[jj]  # not parallel
    for m in np.flatnonzero(ok)[np.argsort(area[ok], kind="stable")]:
        g = np.linalg.inv(vec[[ii[m], jj[m]]]).T * to_bins
        hk = np.rint(pts_bins @ np.linalg.inv(g))
        if np.linalg.matrix_rank(hk) < 2:
            continue
        fit = np.linalg.lstsq(hk, pts_bins, rcond=None)[0]
        if np.max(np.linalg.norm(pts_bins - hk @ fit, axis=1)) <= tol_bins:
            if not all_bases:
                return g
            if not any(abs(abs(np.linalg.det(g)) - abs(np.linalg.det(o))) < 1e-6 * abs(np.linalg.det(g))
                       and np.allclose(np.rint(np.linalg.solve(o.T, g.T)), np.linalg.solve(o.T, g.T), atol=1e-6)
                       for o in out):
                out.append(g)
            if len(out) >= max_bases:
                break
    return out if all_bases else None


@dataclass(frozen=True)
class _Fit:
    g_bins: np.ndarray
    resid: np.ndarray
    cov: np.ndarray
    use: np.ndarray
    hk: np.ndarray
    pts_ref: np.ndarray
    chi2: float  # mean squared residual / expected peak-position variance (≈ 1–2 for the right lattice)

    @property
    def n(self) -> int:
        return len(self.use)


def _refined_fit(fw, pts_bins, snr, g_bins, scale_A) -> _Fit:
    """Reduce basis ``g_bins``, index the peaks, refine the indexed ones jointly and fit the basis (twice)."""
    ny, nx = fw.shape
    to_px = np.array([ny, nx], dtype=float)

    def real_px(gb):
        return np.linalg.inv(gb / to_px).T

    # Reduce the cell now (in Å metric: pixels need not be square) so all indices below are final.
    m = reduce_basis(real_px(g_bins) * scale_A)
    g_bins = np.linalg.inv(m.astype(float)).T @ g_bins
    hk, ok, _ = _index(pts_bins, g_bins, max_order=8)
    refined: dict[int, tuple[float, float]] = {}
    for _round in range(2):
        use = np.flatnonzero(ok)
        use = use[np.argsort(-snr[use])][:_MAX_REFINED]
        k0 = np.array([refined.get(u, (pts_bins[u, 0] / ny, pts_bins[u, 1] / nx)) for u in use]).reshape(-1, 2)
        kref = refine_peaks(fw, k0) if len(k0) else k0
        refined.update({int(u): (float(a), float(b)) for u, (a, b) in zip(use, kref)})
        pts_ref = kref * to_px
        # Peak-position variance in bins²: statistical part ∝ 1/SNR, plus a systematic floor.
        var = _POS_VAR_SNR / snr[use] + _POS_FLOOR_BINS2
        hk_use = hk[use]
        if len(use) < 2 or np.linalg.matrix_rank(hk_use) < 2:
            return _Fit(g_bins, np.zeros((len(use), 2)), np.eye(2), use, hk_use, pts_ref, float("inf"))
        g_bins, resid, cov = _lsq_basis(hk_use, pts_ref, var)
        # Drop gross outliers (a mis-indexed or overlapping peak) and refit once.
        rn = np.linalg.norm(resid, axis=1)
        keep = rn <= max(0.15, 5.0 * float(np.median(rn)))
        if keep.sum() >= 3 and not keep.all():
            use, pts_ref, var, hk_use = use[keep], pts_ref[keep], var[keep], hk_use[keep]
            g_bins, resid, cov = _lsq_basis(hk_use, pts_ref, var)
        hk, ok, _ = _index(pts_bins, g_bins, max_order=20)
    chi2 = float(np.mean(np.sum(resid**2, axis=1) / var))
    return _Fit(g_bins, resid, cov, use, hk_use, pts_ref, chi2)


def _lsq_basis(hk: np.ndarray, pts: np.ndarray, var: np.ndarray):
    if len(hk) < 2 or np.linalg.matrix_rank(hk.astype(float)) < 2:
        raise LatticeNotFound("no periodic lattice: the indexed Bragg peaks are all along one direction")
    w = 1.0 / var
    sw = np.sqrt(w)[:, None]
    x = hk.astype(float)
    g, *_ = np.linalg.lstsq(x * sw, pts * sw, rcond=None)
    resid = pts - x @ g
    dof = max(2 * len(pts) - 4, 1)
    chi2 = float(np.sum(w[:, None] * resid**2)) / dof
    # The variances are absolute (calibrated), so a scatter smaller than they predict (few peaks, chance)
    # must not shrink the uncertainty below them; a larger one (misfit) inflates it.
    cov_comp = np.linalg.inv((x * w[:, None]).T @ x) * max(chi2, 1.0)
    return g, resid, cov_comp


def measure_lattice(
    image: StemImage,
    *,
    min_spacing_A: float = 1.0,
    max_spacing_A: float = 15.0,
    snr_threshold: float | None = None,
    min_periodicity: float = 0.01,
) -> MeasuredLattice:
    """Measure the 2D lattice of ``image`` (see the module doc for the method and conventions).

    ``min_spacing_A``/``max_spacing_A`` bound the lattice-plane spacings searched. ``snr_threshold``
    overrides the false-alarm threshold on peak power / background. Raises ``LatticeNotFound`` for
    blank, amorphous or otherwise non-periodic images.
    """
    data = np.asarray(image.data, dtype=np.float64)
    if data.size and float(np.ptp(data)) == 0.0:
        raise LatticeNotFound("the image is blank (constant): there is no lattice to measure")
    image.validate()
    if not (0 < min_spacing_A < max_spacing_A):
        raise ValueError("need 0 < min_spacing_A < max_spacing_A")
    py, px = image.pixel_size_A
    ny, nx = data.shape
    nyq = 2.0 * max(py, px) / 0.9
    if max_spacing_A <= nyq:
        raise LatticeNotFound(
            f"spacings up to {max_spacing_A} Å are below the Nyquist limit of this sampling ({nyq:.2f} Å)"
        )
    fw = windowed(data)
    power, bg, ratio = _snr_map(fw)
    band = _band_mask(data.shape, image.pixel_size_A, max(min_spacing_A, 1e-6), max_spacing_A)
    kr, kc = frequency_grids(data.shape)
    half = (kr > 0) | ((kr == 0) & (kc > 0))
    thr = float(snr_threshold) if snr_threshold is not None else float(np.log(max(int(band.sum()), 2)) + 12.0)
    # Maxima of the power itself: the ring background is piecewise constant, so maxima of the ratio can
    # sit one bin off a peak at a ring boundary.
    local_max = power == ndimage.maximum_filter(power, size=5, mode="wrap")
    # Window side lobes of a very strong peak (noise-free images) are local maxima too: Hann's first side
    # lobe is 7e-4 of the main lobe in power, so anything that faint next to a stronger peak is dropped.
    local_max &= power >= 2e-3 * ndimage.maximum_filter(power, size=9, mode="wrap")
    sel = local_max & band & half & (ratio > thr)
    ii, jj = np.nonzero(sel)
    strongest = float(ratio[band].max()) if band.any() else 0.0
    weak_hk = None
    if len(ii) < 2:
        ii, jj, weak_hk = _weak_lattice_peaks(ratio, local_max & band & half, band, kr * ny, kc * nx, thr)
    if len(ii) < 2:
        raise LatticeNotFound(
            f"no periodic lattice: {len(ii)} Bragg peak(s) above the noise floor between "
            f"{min_spacing_A:g} and {max_spacing_A:g} Å (strongest {strongest:.1f}× background, needed {thr:.1f}×)"
        )
    snr = ratio[ii, jj]
    order = np.argsort(-snr)[:80]
    ii, jj, snr = ii[order], jj[order], snr[order]
    pts_bins = np.stack([kr[ii, jj] * ny, kc[ii, jj] * nx], axis=1) + _coarse_offsets(power, ii, jj)

    # Longest real-space basis vector sought: a reduced cell's vectors are at most d_max / sin 60°.
    max_len_px = max_spacing_A / min(py, px) / math.sin(math.radians(60.0))
    if weak_hk is not None:
        # a weak lattice's peaks are indexed already; their coarse positions are too noisy to index them again
        pts_bins = refine_peaks(fw, pts_bins / np.array([ny, nx], dtype=float)) * np.array([ny, nx], dtype=float)
        g_bins = np.linalg.lstsq(weak_hk[order].astype(float), pts_bins, rcond=None)[0]
    else:
        g_bins = _choose_basis(pts_bins, snr, fw, max_len_px)
    if g_bins is None:
        lengths = np.linalg.norm(pts_bins, axis=1)
        cross = np.abs(pts_bins[:, None, 0] * pts_bins[None, :, 1] - pts_bins[:, None, 1] * pts_bins[None, :, 0])
        if np.all(cross <= math.sin(math.radians(15.0)) * np.outer(lengths, lengths)):
            raise LatticeNotFound(
                f"no periodic lattice: the {len(ii)} peak(s) above the noise floor are all collinear "
                "(a 1D fringe pattern or scan artefact, not a 2D lattice)"
            )
        raise LatticeNotFound(
            f"no periodic lattice: the {len(ii)} peak(s) above the noise floor do not lie on one 2D lattice"
        )

    to_px = np.array([ny, nx], dtype=float)
    scale_A = np.array([py, px])
    fit = _refined_fit(fw, pts_bins, snr, g_bins, scale_A)
    if fit.chi2 > _CHI2_SUSPECT:
        # The pair test on coarse peak positions is loose (±0.35 bin): a wrong lattice close to the right
        # one can pass it (TlS, an oblique 4.0 × 12.4 Å cell whose strong orders (0,4), (2,1), (1,−1), ...
        # were indexed by a 4.0 × 9.2 Å rectangle, 0.17 bin rms). The refined peaks are precise, so the
        # lattice they generate is tried, and kept when it explains them clearly better.
        fits = [_refined_fit(fw, pts_bins, snr, g, scale_A)
                for g in _generated_basis(fit.pts_ref, fw.shape, max_len_px, all_bases=True)]
        fits = [f for f in fits if f.n >= fit.n - max(1, fit.n // 10) and np.isfinite(f.chi2)]
        if fits:
            best = min(f.chi2 for f in fits)
            # the smallest cell that fits about as well as any (a supercell fits the same peaks as well)
            alt = max((f for f in fits if f.chi2 <= 1.5 * best), key=lambda f: abs(np.linalg.det(f.g_bins)))
            if alt.chi2 < fit.chi2 / _CHI2_GAIN:
                fit = alt
    g_bins, resid, cov, use, hk_use, pts_ref = fit.g_bins, fit.resid, fit.cov, fit.use, fit.hk, fit.pts_ref

    n_idx = len(use)
    if n_idx < 2:
        raise LatticeNotFound("no periodic lattice: fewer than two Bragg peaks could be indexed")

    periodicity = _periodicity(power, bg, band, g_bins)
    if periodicity < min_periodicity:
        raise LatticeNotFound(
            f"no periodic lattice: only {100 * periodicity:.2f} % of the spectral power is on Bragg peaks "
            f"(need {100 * min_periodicity:.1f} %); the image looks amorphous or non-periodic"
        )

    g_px = g_bins / to_px
    a_px = np.linalg.inv(g_px).T
    a_A = a_px * scale_A
    la, lb, gam = cell_parameters(a_A)

    # Propagate the 2×2 covariance of each component column of G (rows/cols independent) to a, b, γ.
    def params(gflat):
        gb = gflat.reshape(2, 2)
        return np.array(cell_parameters(np.linalg.inv(gb / to_px).T * scale_A))

    g0 = g_bins.ravel()
    cov4 = np.zeros((4, 4))
    for comp in range(2):  # component (row or col) of g1 and g2 -> flat indices comp, 2+comp
        idx = [comp, 2 + comp]
        cov4[np.ix_(idx, idx)] = cov
    jac = np.zeros((3, 4))
    for k in range(4):
        h = 1e-6 * max(1.0, abs(g0[k]))
        d = np.zeros(4)
        d[k] = h
        jac[:, k] = (params(g0 + d) - params(g0 - d)) / (2 * h)
    pcov = jac @ cov4 @ jac.T
    sig = np.sqrt(np.maximum(np.diag(pcov), 0.0))

    peaks_px = pts_ref / to_px
    rot = math.degrees(math.atan2(a_A[0, 0], a_A[0, 1]))
    return MeasuredLattice(
        vectors_px=a_px,
        vectors_A=a_A,
        reciprocal_px=g_px,
        a_A=la,
        b_A=lb,
        gamma_deg=gam,
        a_sigma_A=float(sig[0]),
        b_sigma_A=float(sig[1]),
        gamma_sigma_deg=float(sig[2]),
        rotation_deg=rot,
        pixel_size_A=(py, px),
        shape=(ny, nx),
        peak_snr=float(np.max(snr[use])),
        n_indexed=int(n_idx),
        periodicity=float(periodicity),
        peaks_px=peaks_px,
        peak_indices=hk_use.astype(np.int64),
        peak_snrs=snr[use].astype(float),
        residual_rms_bins=float(np.sqrt(np.mean(np.sum(resid**2, axis=1)))),
    )


def _coarse_offsets(power: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Sub-bin offsets of FFT-grid maxima from a 3-point log-parabola per axis (~0.1 bin, for indexing)."""
    ny, nx = power.shape
    lp = np.log(np.maximum(power, 1e-300))
    c = lp[ii, jj]
    def vertex(m, p):
        den = m - 2 * c + p
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(den < 0, 0.5 * (m - p) / den, 0.0)
        return np.clip(np.nan_to_num(d), -0.5, 0.5)
    dr = vertex(lp[(ii - 1) % ny, jj], lp[(ii + 1) % ny, jj])
    dc = vertex(lp[ii, (jj - 1) % nx], lp[ii, (jj + 1) % nx])
    return np.stack([dr, dc], axis=1)


def _periodicity(power, bg, band, g_bins, radius_bins: float = 2.0) -> float:
    """Background-subtracted power within ``radius_bins`` of lattice points / all power in the band."""
    ny, nx = power.shape
    total = float(np.sum(power[band]))
    if total <= 0:
        return 0.0
    kmax = np.array([ny, nx]) * 0.5
    gmin = np.min(np.abs(np.linalg.svd(g_bins, compute_uv=False)))
    nmax = int(np.ceil(np.hypot(*kmax) / max(gmin, 1e-9))) + 1
    nmax = min(nmax, 200)
    h, k = np.meshgrid(np.arange(-nmax, nmax + 1), np.arange(-nmax, nmax + 1), indexing="ij")
    pts = np.stack([h.ravel(), k.ravel()], axis=1) @ g_bins
    pts = pts[(np.abs(pts[:, 0]) < kmax[0]) & (np.abs(pts[:, 1]) < kmax[1])]
    r = int(np.ceil(radius_bins))
    di, dj = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
    disk = (di**2 + dj**2) <= radius_bins**2
    di, dj = di[disk], dj[disk]
    ci = np.rint(pts[:, 0])[:, None].astype(np.int64) + di[None, :]
    cj = np.rint(pts[:, 1])[:, None].astype(np.int64) + dj[None, :]
    mask = np.zeros_like(band)
    mask[ci.ravel() % ny, cj.ravel() % nx] = True
    mask &= band
    return float(np.sum(np.maximum(power[mask] - bg[mask], 0.0)) / total)
