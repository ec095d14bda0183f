"""Rank library templates against an observed image.

The physics: a crystal's image is a Fourier series over its reciprocal lattice, so its Bragg amplitudes
|F(h, k)| are a translation-invariant fingerprint of the motif and its column contrast (heavy vs light
species set the ratios between reflection families). Once the observed lattice is measured, indexing
the image's reflections in a given basis removes the rotation; what remains is a *finite* ambiguity —
which of the equivalent cell choices (lattice automorphisms, mirror included because a flipped flake
images as its mirror) and which small supercell of the observed primitive cell the template's cell is.
So retrieval is:

1. **Frames.** From the measured basis, every sublattice of index 1–4 (Hermite normal forms), Gauss
   reduced, times every unimodular matrix with entries in {-1, 0, 1}: ~600 candidate bases.
2. **Lattice compatibility** (vectorised over templates × frames): the scale-free metric (shape) must
   agree within a strain tolerance, and the scale (Å per nominal Å) must be within the calibration
   tolerance — so a ±10 % pixel-size error and ±3 % strain do not matter, while the absolute size still
   acts as a soft prior.
3. **Physics match** for compatible pairs: the observed Bragg amplitudes, sampled at the template's
   (h, k) in that frame from one windowed, padded power spectrum (noise floor per |k| ring removed),
   are fitted by the template's fast-model amplitudes × scale × exp(-B g²) (B absorbs probe/source and
   thermal blur differences between the fast model and reality) with a noise + 10 % model-error
   variance, i.e. an SNR-weighted χ². Weak, noisy reflections weigh little by construction.
4. **Phases** (``phase=True``, the default): amplitudes cannot tell look-alikes apart (1T vs 2H, MoS2 vs
   NbS2/MoCl2, graphene vs LiC12 differ mostly in where the columns sit, not in |F|). The best
   ``N_SHORT`` templates of the amplitude fit, each with its best ``N_FRAMES`` cell choices, are re-scored
   with the complex coefficients: the image's DFT at each frame's reflections (= the cell average of
   ``reconstruct.cellavg``) against the template's coefficients × c·exp(-B g²)·exp(-2πi hk·s), maximised
   over the origin shift s (a coarse FFT grid, then Newton steps, vectorised over candidates), which makes
   the score translation-invariant while keeping the relative phases, i.e. the motif. The χ² runs over the
   union of all candidates' reflections, so sub- and supercell templates are compared on the same data.
   A flat prior on |ln scale| ≤ 10 % (pixel-size calibration) with steep walls outside replaces the wide
   amplitude-stage prior.
5. **Calibrated scores**: the reduced χ² plus the lattice priors form a log-likelihood; candidates get
   softmax probabilities (one temperature, calibrated on the benchmark) and an absolute fit quality.
   When even the best fit is poor, the image is flagged "outside library" and the best *prototype*
   (anonymous formula + lattice type) is proposed with element assignments from the fitted per-species
   contrast (mode-dependent Z-scaling from the same fast model).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import LibraryError, NoCandidate
from ..imaging.image import StemImage
from .index import TemplateLibrary

__all__ = ["Candidate", "RetrievalResult", "retrieve", "ObservedSpectrum"]

#: Tolerances (see module doc); strain is "metric strain" (≈ |ε| for a uniform strain ε).
STRAIN_TOL = 0.06
STRAIN_SIGMA = 0.025
SCALE_TOL = 0.20
SCALE_SIGMA = 0.08
MODEL_ERROR = 0.12
B_GRID = np.linspace(-0.4, 1.2, 17)  # Å², envelope exp(-B g²) mismatch between model and image
#: softmax temperature on the per-point log-likelihood and the fit-quality threshold for "outside library"
TEMPERATURE = 0.05
OUTSIDE_CHI2 = 6.0
#: highest spatial frequency compared (1/Å); pairs kept after the cheap first pass; prior weight
G_LIMIT = 1.6
N_REFINE = 300
N_PRIOR = 10.0
#: phase-aware second stage: templates short-listed by the amplitude χ², frames kept per template, blur grid
#: (Å²), shift grid per cell axis, model error relative to |O|, calibration window on |ln scale| (flat inside)
N_SHORT = 40
N_FRAMES = 16
B_PHASE = np.array([-0.2, 0.0, 0.25, 0.5, 0.8])
SHIFT_GRID = 32
PHASE_MODEL_ERROR = 0.15
CALIB_WINDOW = 0.10
CALIB_SIGMA = 0.025
#: optional Gaussian preference for a small calibration error (weight × ½(ln scale / width)²); off: with a
#: ±8 % calibration error it favours the wrong one of two look-alikes whose lattice constants differ by ~5 %
CALIB_PREFER = (0.0, 0.05)
#: images on an absolute scale (fraction of the incident beam): weak prior on ln(image/model contrast). abTEM
#: multislice at 300 kV comes out ~30 % brighter than the fast model in ADF (ln-spread 0.21 over the
#: benchmark's true templates) and ~5 % dimmer in iDPC (spread 0.05); the centre sits between the fast model
#: (0) and multislice so that both kinds of image are fine, and the width covers the ADF spread
ABS_CENTER = {"adf": 0.12, "haadf": 0.12, "idpc": -0.03, "dpc": -0.03}
ABS_SIGMA = 0.4
ABS_WEIGHT = 0.1
#: softmax temperature (fitted on the benchmark: mean top-1 probability ≈ top-1 accuracy) and "outside
#: library" threshold on the phase stage's χ²/point (above every in-library image of the benchmark)
PHASE_TEMPERATURE = 0.02
OUTSIDE_PHASE_CHI2 = 1.0
#: width of the prior on ln(observed/template amplitude) for images on an absolute (beam fraction) scale
SIGMA_ABS = 0.3


@dataclass(frozen=True)
class Candidate:
    """One ranked template. ``probability`` is calibrated (softmax over candidates); ``quality`` is the
    absolute goodness of fit in (0, 1] (1/(1 + (χ²_red − 1)/5)); ``scale`` is true/nominal pixel size."""

    rank: int
    template_id: str
    index: int
    formula: str
    anonymous_formula: str
    lattice_type: str
    elements: tuple[str, ...]
    probability: float
    quality: float
    chi2_red: float
    lattice_strain: float
    scale: float
    b_factor_A2: float
    contrast_scale: float
    supercell: tuple[tuple[int, int], tuple[int, int]]
    frame: tuple[tuple[float, float], tuple[float, float]]
    outside_library: bool = False
    proposed_elements: dict | None = None
    ncc: float = float("nan")  # phase-aware normalised correlation at the best origin shift (nan: amplitude-only)
    shift: tuple[float, float] = (0.0, 0.0)  # that origin shift, fractional in the template cell

    def as_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["elements"] = list(self.elements)
        d["supercell"] = [list(r) for r in self.supercell]
        d["frame"] = [list(r) for r in self.frame]
        d["shift"] = list(self.shift)
        d["ncc"] = float(self.ncc) if math.isfinite(self.ncc) else None  # JSON/AiiDA-safe
        return d


@dataclass(frozen=True)
class RetrievalResult:
    candidates: tuple[Candidate, ...]
    mode: str
    library: str
    build_key: str
    lattice_A: tuple[float, float, float]  # a, b, gamma of the measured lattice (nominal calibration)
    outside_library: bool
    prototype: Candidate | None
    n_compatible: int
    seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def as_dict(self) -> dict:
        return {
            "candidates": [c.as_dict() for c in self.candidates],
            "mode": self.mode, "library": self.library, "build_key": self.build_key,
            "lattice_A": list(self.lattice_A), "outside_library": self.outside_library,
            "prototype": None if self.prototype is None else self.prototype.as_dict(),
            "n_compatible": self.n_compatible, "seconds": self.seconds, "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------------------------------------------
# observed spectrum


class ObservedSpectrum:
    """Windowed, zero-padded power spectrum with a per-ring noise floor; sampled at arbitrary frequencies.

    Sampling takes the maximum over a 3×3 neighbourhood of padded bins (tolerates sub-bin lattice error);
    the expected maximum of noise over 9 bins (H₉ ≈ 2.83 × floor) is subtracted.
    """

    def __init__(self, image: StemImage, min_padded: int = 512):
        from scipy import ndimage

        from ..lattice.fft import hann2d

        data = np.asarray(image.data, dtype=np.float64)
        win = hann2d(data.shape)
        mean = float(np.sum(data * win) / np.sum(win))
        fw = (data - mean) * win
        ny, nx = data.shape
        self.pad = (max(2 * ny, min_padded), max(2 * nx, min_padded))
        F = np.fft.fft2(fw, s=self.pad)
        power = F.real**2 + F.imag**2
        self.power_max = ndimage.maximum_filter(power, size=3, mode="wrap")
        self.floor = self._ring_floor(power)
        self.shape = (ny, nx)
        self.window_sum = float(np.sum(win))

    def _ring_floor(self, power):
        from scipy import ndimage

        py, px = power.shape
        fy = np.fft.fftfreq(py)[:, None]
        fx = np.fft.fftfreq(px)[None, :]
        rad = np.hypot(fy * py, fx * px)
        labels = np.floor(rad / 4.0).astype(np.int64)
        n = int(labels.max()) + 1
        med = np.asarray(ndimage.median(power, labels=labels, index=np.arange(n)), dtype=float)
        med = np.where(np.isfinite(med) & (med > 0), med, np.nan)
        good = np.flatnonzero(~np.isnan(med))
        med = np.interp(np.arange(n), good, med[good])
        self._ring = med / math.log(2.0)
        self._ring_width = 4.0
        return None

    def sample(self, f_xy: np.ndarray):
        """Amplitude estimate and noise std at frequencies ``f_xy`` (..., 2) in cycles/px (x=col, y=row)."""
        fx, fy = f_xy[..., 0], f_xy[..., 1]
        valid = (np.abs(fx) < 0.5) & (np.abs(fy) < 0.5)
        py, px = self.pad
        r = np.rint(fy * py).astype(np.int64) % py
        c = np.rint(fx * px).astype(np.int64) % px
        pm = self.power_max[r, c]
        rad = np.hypot(fy * py, fx * px)
        ring = np.clip((rad / self._ring_width).astype(np.int64), 0, len(self._ring) - 1)
        floor = self._ring[ring]
        amp = np.sqrt(np.clip(pm - 2.83 * floor, 0.0, None))
        sigma = np.sqrt(0.5 * floor)
        return amp, sigma, valid


# ------------------------------------------------------------------------------------------------------
# phase-aware stage: complex lattice coefficients, best origin shift per candidate


def windowed_image(image: StemImage) -> np.ndarray:
    """Mean-subtracted, Hann-windowed image (the same weighting as ``ObservedSpectrum``)."""
    from ..lattice.fft import hann2d

    data = np.asarray(image.data, dtype=np.float64)
    win = hann2d(data.shape)
    mean = float(np.sum(data * win) / np.sum(win))
    return (data - mean) * win


def dft_at(fw: np.ndarray, f_xy: np.ndarray) -> np.ndarray:
    """Fourier coefficients Σ fw[r, c] exp(-2πi (fx c + fy r)) at arbitrary frequencies (n, 2) in cycles/px.

    Separable, so the cost is one (n × rows) @ (rows × cols) product: for a periodic image this is the
    projection onto the lattice harmonics (``reconstruct.cellavg``) at exactly the frequencies needed.
    """
    f_xy = np.asarray(f_xy, dtype=float).reshape(-1, 2)
    ny, nx = fw.shape
    ey = np.exp(-2j * np.pi * np.outer(f_xy[:, 1], np.arange(ny)))
    ex = np.exp(-2j * np.pi * np.outer(f_xy[:, 0], np.arange(nx)))
    return np.einsum("nc,nc->n", ey @ fw, ex)


def _phase_stage(fw, spec, A_px, T, pt, pf, coeffs, hk, g_A, scale, g_lim):
    """Shift-optimised complex fit of each (template, frame) pair over one common set of observed reflections.

    For pair k, the observed coefficient at template index (h, k) is the image's DFT at that frequency; the
    model is the template's fast-model coefficient × c × exp(-B g²) × exp(-2πi hk·s) with a free origin
    shift s (translation), contrast c ≥ 0 and blur B. With observation-based weights w (noise from the
    spectrum's ring floor + a relative model error), the weighted χ² over the union P of all pairs'
    reflections is Σ_P w|O|² − max_s (Re Σ w O M* e^{2πi hk·s})² / Σ w|M|², so pairs with different cells
    (sub- and supercells) are compared on the same data: reflections a template does not have count as
    residual. Returns χ²/|P|, the normalised correlation, B, c and s per pair.
    """
    K, m = len(pt), len(hk)
    Tf = T[pf].astype(float)
    Tinv_T = np.transpose(np.linalg.inv(Tf), (0, 2, 1))
    h_obs = np.einsum("mi,kij->kmj", hk.astype(float), Tinv_T)  # template index -> observed-basis index
    key = np.rint(12.0 * h_obs).astype(np.int64)
    first = np.where(key[..., 0] != 0, key[..., 0], key[..., 1])
    sign = np.where(first > 0, 1, -1)
    canon = key * sign[..., None]
    B_obs = np.linalg.inv(A_px).T
    f_all = (canon / 12.0) @ B_obs
    ok = (g_A[pf] <= g_lim) & np.all(np.abs(f_all) < 0.5, axis=-1)
    flat = canon[ok]
    uniq, inv = np.unique(flat[:, 0] * 100003 + flat[:, 1], return_inverse=True)
    rep = np.zeros(len(uniq), dtype=np.int64)
    rep[inv] = np.arange(len(flat))
    f_u = (flat[rep] / 12.0) @ B_obs
    O_u = dft_at(fw, f_u)
    py, px = spec.pad
    rad = np.hypot(f_u[:, 1] * py, f_u[:, 0] * px)
    ring = np.clip((rad / spec._ring_width).astype(np.int64), 0, len(spec._ring) - 1)
    var_u = spec._ring[ring]
    a2 = np.abs(O_u) ** 2
    w_u = 1.0 / (var_u + PHASE_MODEL_ERROR**2 * a2 + (0.02**2) * float(a2.max(initial=0.0)) + 1e-300)
    total = float(np.sum(w_u * a2))
    n_pts = max(len(uniq), 1)
    O = np.zeros((K, m), dtype=complex)
    w = np.zeros((K, m))
    Ok = O_u[inv]
    O[ok] = np.where(sign[ok] > 0, Ok, np.conj(Ok))
    w[ok] = w_u[inv]
    M = coeffs[pt]
    g2 = (g_A[pf] / scale[:, None]) ** 2
    X0 = w * O * np.conj(M)
    G = SHIFT_GRID
    hh = np.mod(hk[:, 0], G)
    kk = np.mod(hk[:, 1], G)
    hkf = hk.astype(float)
    best = dict(gain=np.full(K, -np.inf), corr=np.zeros(K), mm=np.ones(K), B=np.zeros(K), s=np.zeros((K, 2)))
    for Bf in B_PHASE:
        env = np.exp(-Bf * g2)
        X = X0 * env
        mm = np.sum(w * np.abs(M * env) ** 2, axis=1) + 1e-300
        grid = np.zeros((K, G, G), dtype=complex)
        grid[:, hh, kk] = X
        corr_grid = np.real(np.fft.ifft2(grid)) * (G * G)
        j = np.argmax(corr_grid.reshape(K, -1), axis=1)
        s = np.stack([j // G, j % G], axis=1) / G
        for _ in range(3):  # Newton steps on the continuous shift
            e = np.exp(2j * np.pi * (s @ hkf.T))
            Xe = X * e
            grad = np.real(1j * 2 * np.pi * Xe @ hkf)
            H = -4 * np.pi**2 * np.einsum("km,ma,mb->kab", np.real(Xe), hkf, hkf)
            det = H[:, 0, 0] * H[:, 1, 1] - H[:, 0, 1] ** 2
            good = (H[:, 0, 0] < 0) & (det > 0)
            Hs = np.where(good[:, None, None], H, -np.eye(2)[None] * 1e6)
            step = -np.linalg.solve(Hs, grad[..., None])[..., 0]
            step = np.clip(step, -0.5 / G, 0.5 / G)
            s = s + np.where(good[:, None], step, 0.0)
        corr = np.real(np.sum(X * np.exp(2j * np.pi * (s @ hkf.T)), axis=1))
        gain = np.maximum(corr, 0.0) ** 2 / mm
        better = gain > best["gain"]
        best["gain"] = np.where(better, gain, best["gain"])
        best["corr"] = np.where(better, corr, best["corr"])
        best["mm"] = np.where(better, mm, best["mm"])
        best["B"] = np.where(better, Bf, best["B"])
        best["s"] = np.where(better[:, None], s, best["s"])
    own = np.sum(w * np.abs(O) ** 2, axis=1) + 1e-300
    ncc = best["corr"] / np.sqrt(own * best["mm"])
    chi2_red = (total - best["gain"]) / n_pts
    contrast = np.maximum(best["corr"], 0.0) / best["mm"] / spec.window_sum  # image = contrast × model
    return chi2_red, ncc, best["B"], contrast, np.mod(best["s"], 1.0), n_pts


# ------------------------------------------------------------------------------------------------------
# frames


def _hnf(max_index: int = 4) -> list[np.ndarray]:
    out = []
    for det in range(1, max_index + 1):
        for a in range(1, det + 1):
            if det % a:
                continue
            d = det // a
            for b in range(d):
                out.append(np.array([[a, b], [0, d]]))
    return out


_UNIMODULAR = [np.array(m).reshape(2, 2) for m in itertools.product((-1, 0, 1), repeat=4)
               if abs(round(np.linalg.det(np.array(m).reshape(2, 2)))) == 1]


def _gauss_reduce_int(A: np.ndarray) -> np.ndarray:
    """Integer matrix M with M @ A Gauss-reduced (rows of A are basis vectors)."""
    M = np.eye(2, dtype=np.int64)
    B = A.astype(float).copy()
    for _ in range(100):
        if B[0] @ B[0] > B[1] @ B[1]:
            B = B[::-1].copy()
            M = M[::-1].copy()
        mu = int(np.round((B[0] @ B[1]) / (B[0] @ B[0])))
        if mu == 0:
            break
        B[1] -= mu * B[0]
        M[1] -= mu * M[0]
    return M


def _frames(A_obs_px: np.ndarray, max_index: int = 4):
    """All candidate template bases in units of the observed basis: integer T with A = T @ A_obs."""
    Ts = []
    seen = set()
    for N in _hnf(max_index):
        M = _gauss_reduce_int(N @ A_obs_px)
        base = M @ N
        for U in _UNIMODULAR:
            T = U @ base
            key = tuple(T.ravel())
            if key not in seen:
                seen.add(key)
                Ts.append(T)
    return np.array(Ts, dtype=np.int64)


def _metric_features(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised metric (G11, G22, G12)/tr(G) and tr(G) for bases (..., 2, 2)."""
    G = A @ np.swapaxes(A, -1, -2)
    tr = G[..., 0, 0] + G[..., 1, 1]
    feat = np.stack([G[..., 0, 0], G[..., 1, 1], G[..., 0, 1]], axis=-1) / tr[..., None]
    return feat, tr


# ------------------------------------------------------------------------------------------------------
# retrieval


def _select_mode(image: StemImage, library: TemplateLibrary, mode: str | None) -> str:
    mode = (mode or image.microscope.mode).lower()
    if mode in library.modes:
        return mode
    aliases = {"haadf": ("adf",), "adf": ("haadf",), "dpc": ("idpc",), "idpc": ("dpc",), "abf": ("bf",), "bf": ("abf",)}
    for alt in aliases.get(mode, ()):
        if alt in library.modes:
            return alt
    raise LibraryError(f"library {library.name!r} has no templates for mode {mode!r} (it has {', '.join(library.modes)}); rebuild it with --modes {mode}")


def _element_filter(library: TemplateLibrary, elements) -> np.ndarray:
    if elements is None:
        return np.ones(len(library), dtype=bool)
    from ase.data import atomic_numbers

    from ..errors import UnknownElement

    if isinstance(elements, str):
        elements = [e for e in elements.replace(",", " ").split() if e]
    allowed = set()
    for e in elements:
        e = e.strip().capitalize()
        if e not in atomic_numbers:
            raise UnknownElement(f"{e!r} is not a chemical element")
        allowed.add(e)
    return np.array([s <= allowed for s in library.element_sets()])


def retrieve(
    image: StemImage,
    library: TemplateLibrary,
    *,
    lattice=None,
    k: int = 5,
    elements=None,
    mode: str | None = None,
    max_supercell: int = 4,
    propose_outside: bool = True,
    outside_chi2: float | None = None,
    phase: bool = True,
) -> RetrievalResult:
    """Top-``k`` templates for ``image`` (see the module doc). ``lattice``: a ``MeasuredLattice`` (measured
    here when omitted). ``elements``: only templates whose elements are all in this set (e.g. "Mo,S")."""
    t0 = time.perf_counter()
    warnings: list[str] = []
    mode = _select_mode(image, library, mode)
    mic_lib = library.microscope_for(mode)
    mic_img = image.microscope
    if abs(mic_img.voltage_kV - mic_lib.voltage_kV) > 1e-6 or abs(mic_img.semiangle_mrad - mic_lib.semiangle_mrad) > 1e-6:
        warnings.append(
            f"image optics ({mic_img.voltage_kV:g} kV, {mic_img.semiangle_mrad:g} mrad) differ from the library's "
            f"({mic_lib.voltage_kV:g} kV, {mic_lib.semiangle_mrad:g} mrad); scores are less reliable"
        )
    if lattice is None:
        from ..lattice.measure import measure_lattice

        lattice = measure_lattice(image)
    allowed = _element_filter(library, elements)
    if not allowed.any():
        raise NoCandidate(f"no template in library {library.name!r} has only the elements {elements}")

    # observed basis, (x, y) = (col, row) components, in px and in nominal Å
    A_px = np.asarray(lattice.vectors_px, dtype=float)[:, ::-1]
    A_A = np.asarray(lattice.vectors_A, dtype=float)[:, ::-1]
    spec = ObservedSpectrum(image)

    # 1. frames and 2. lattice compatibility
    T = _frames(A_px, max_supercell)  # (F, 2, 2)
    FA = T.astype(float) @ A_A  # frame bases in nominal Å
    f_feat, f_tr = _metric_features(FA)
    t_feat, t_tr = _metric_features(library.cells_2d)
    diff = t_feat[:, None, :] - f_feat[None, :, :]  # (n, F, 3)
    strain = 0.5 * np.sqrt(diff[..., 0] ** 2 + diff[..., 1] ** 2 + 2 * diff[..., 2] ** 2)
    scale = np.sqrt(t_tr[:, None] / f_tr[None, :])  # true Å / nominal Å
    compat = (strain <= STRAIN_TOL) & (np.abs(np.log(scale)) <= np.log(1 + SCALE_TOL)) & allowed[:, None]
    ti, fi = np.nonzero(compat)
    if len(ti) == 0:
        raise NoCandidate(
            f"no template has a lattice compatible with the measured one (a={lattice.a_A:.3f} Å, b={lattice.b_A:.3f} Å, "
            f"γ={lattice.gamma_deg:.1f}°) within ±{SCALE_TOL:.0%} scale and {STRAIN_TOL:.0%} strain"
        )

    # 3. physics match: sample observed amplitudes at each frame's (h, k)
    hk = library.hk.astype(float)
    B_px = np.linalg.inv(T.astype(float) @ A_px).transpose(0, 2, 1)  # reciprocal bases of frames, cycles/px
    f_xy = np.einsum("mi,fij->fmj", hk, B_px)  # (F, m, 2)
    amp, sig, valid = spec.sample(f_xy)
    B_A = np.linalg.inv(FA).transpose(0, 2, 1)
    g_A = np.linalg.norm(np.einsum("mi,fij->fmj", hk, B_A), axis=-1)  # |g| in nominal 1/Å

    X = np.abs(library.coefficients[mode])  # (n, m)
    nyq = 0.45 / max(image.pixel_size_A)  # nominal 1/Å
    g_lim = min(G_LIMIT, nyq, 0.98 * float(np.max(np.abs(library.hk))) / np.max(np.linalg.norm(FA, axis=2), axis=1).min())
    calibrated = str(image.metadata.get("units", "")).startswith("fraction of incident beam")
    fw_sum = spec.window_sum

    def score(sel_t, sel_f, b_grid):
        x = X[sel_t]
        sc_ = scale[sel_t, sel_f]
        y = amp[sel_f] / fw_sum
        s_noise = sig[sel_f] / fw_sum
        g2_ = (g_A[sel_f] / sc_[:, None]) ** 2  # true |g|² (true Å = scale × nominal Å)
        ok = valid[sel_f] & (g_A[sel_f] <= g_lim)
        ymax = np.max(np.where(ok, y, 0), axis=1, keepdims=True) + 1e-30
        var = s_noise**2 + (MODEL_ERROR * y) ** 2 + (0.01 * ymax) ** 2
        w = np.where(ok, 1.0 / var, 0.0)
        best = (np.full(len(sel_t), np.inf), np.zeros(len(sel_t)), np.zeros(len(sel_t)))
        for Bf in b_grid:
            xm = x * np.exp(-Bf * g2_)
            num = np.sum(w * xm * y, axis=1)
            den = np.sum(w * xm * xm, axis=1) + 1e-300
            c = np.clip(num / den, 1e-12, None)
            chi = np.sum(w * (y - c[:, None] * xm) ** 2, axis=1)
            if calibrated:
                chi = chi + (np.log(c) / SIGMA_ABS) ** 2 * np.maximum(np.sum(ok, axis=1), 1) / N_PRIOR
            better = chi < best[0]
            best = (np.where(better, chi, best[0]), np.where(better, Bf, best[1]), np.where(better, c, best[2]))
        npts = np.maximum(np.sum(ok, axis=1), 1)
        chi2_red = best[0] / npts
        st_ = strain[sel_t, sel_f]
        s = -0.5 * chi2_red - 0.5 * ((st_ / STRAIN_SIGMA) ** 2 + (np.log(sc_) / SCALE_SIGMA) ** 2) / N_PRIOR
        return s, chi2_red, best[1], best[2], (y, w, g2_)

    n_compat_templates = int(len(np.unique(ti)))
    ti_all, fi_all = ti, fi
    s1 = score(ti, fi, B_GRID[:: max(1, len(B_GRID) // 3)])[0]  # coarse blur grid: blurred images must not favour big cells
    keep = np.argsort(-s1)[:N_REFINE]
    ti, fi = ti[keep], fi[keep]
    loglik, chi2_red, best_B, best_c, _ = score(ti, fi, B_GRID)
    st = strain[ti, fi]
    sc = scale[ti, fi]
    ncc = np.full(len(ti), np.nan)
    shifts = np.zeros((len(ti), 2))
    if phase:
        # 5. phase-aware re-scoring of a short list: templates ranked high by the amplitude fit (refined, or
        # first pass per template), each with its best few frames (equivalent cell choices, mirror, sub-cells)
        order1 = np.argsort(-s1)
        seen_t: dict = {}
        for j in order1:
            seen_t.setdefault(int(ti_all[j]), len(seen_t))
            if len(seen_t) >= N_SHORT:
                break
        short = list(seen_t)
        for t in ti[np.argsort(-loglik)]:
            if len(short) >= 2 * N_SHORT:
                break
            if int(t) not in seen_t:
                seen_t[int(t)] = len(seen_t)
                short.append(int(t))
        in_short = np.isin(ti_all, short)
        cand = np.flatnonzero(in_short)
        cand = cand[np.lexsort((-s1[cand], ti_all[cand]))]
        rank_in_t = np.arange(len(cand)) - np.searchsorted(ti_all[cand], ti_all[cand], side="left")
        cand = cand[rank_in_t < N_FRAMES]
        ti, fi = ti_all[cand], fi_all[cand]
        st = strain[ti, fi]
        sc = scale[ti, fi]
        chi2_red, ncc, best_B, best_c, shifts, _ = _phase_stage(
            windowed_image(image), spec, A_px, T, ti, fi, library.coefficients[mode], library.hk, g_A, sc, g_lim)
        excess = np.maximum(np.abs(np.log(sc)) - CALIB_WINDOW, 0.0) / CALIB_SIGMA
        loglik = -0.5 * chi2_red - 0.5 * (excess**2 + (st / STRAIN_SIGMA) ** 2 / N_PRIOR)
        loglik = loglik - CALIB_PREFER[0] * 0.5 * (np.log(sc) / CALIB_PREFER[1]) ** 2
        if calibrated:
            lnc = np.log(np.maximum(best_c, 1e-12)) - ABS_CENTER.get(mode, 0.0)
            loglik = loglik - ABS_WEIGHT * 0.5 * (lnc / ABS_SIGMA) ** 2
    # best frame per template
    order = np.lexsort((-loglik, ti))
    first = np.ones(len(order), dtype=bool)
    first[1:] = ti[order][1:] != ti[order][:-1]
    pick = order[first]
    pick = pick[np.argsort(-loglik[pick])]
    n_compatible = n_compat_templates
    ll = loglik[pick]
    temperature = PHASE_TEMPERATURE if phase else TEMPERATURE
    prob = np.exp((ll - ll.max()) / temperature)
    prob /= prob.sum()

    def make(rank, p, pr, outside=False, proposal=None):
        t = int(ti[p])
        Tm = T[fi[p]]
        return Candidate(
            rank=rank, template_id=str(library.ids[t]), index=t, formula=str(library.formulas[t]),
            anonymous_formula=str(library.anonymous[t]), lattice_type=str(library.lattice_types[t]),
            elements=tuple(str(library.elements[t]).split()), probability=float(pr),
            quality=float(1.0 / (1.0 + max(chi2_red[p] - 1.0, 0.0) / 5.0)), chi2_red=float(chi2_red[p]),
            lattice_strain=float(st[p]), scale=float(sc[p]), b_factor_A2=float(best_B[p]), contrast_scale=float(best_c[p]),
            supercell=tuple(tuple(int(v) for v in r) for r in Tm),
            frame=tuple(tuple(float(v) for v in r) for r in (Tm.astype(float) @ np.asarray(lattice.vectors_px, float))),
            outside_library=outside, proposed_elements=proposal, ncc=float(ncc[p]),
            shift=(float(shifts[p][0]), float(shifts[p][1])),
        )

    threshold = (OUTSIDE_PHASE_CHI2 if phase else OUTSIDE_CHI2) if outside_chi2 is None else float(outside_chi2)
    outside = bool(chi2_red[pick[0]] > threshold)
    cands = tuple(make(r + 1, p, prob[r], outside) for r, p in enumerate(pick[:k]))
    prototype = None
    if outside and propose_outside:
        p = pick[0]
        try:
            _, _, _, _, (y, w, g2) = score(ti[p:p + 1], fi[p:p + 1], B_GRID)
            proposal = propose_elements(library, int(ti[p]), mode, y[0], w[0], g2[0], elements=elements, absolute=calibrated)
        except Exception as exc:  # noqa: BLE001 - a proposal is a hint; never fail the retrieval for it
            proposal = None
            warnings.append(f"element proposal failed: {exc}")
        prototype = make(1, p, prob[0], True, proposal)
        warnings.append(
            f"no template fits well (best χ²_red = {chi2_red[p]:.1f} > {threshold:g}); the structure may be outside "
            f"the library: best prototype {prototype.anonymous_formula} ({prototype.lattice_type}, like {prototype.formula})"
        )
    return RetrievalResult(
        candidates=cands, mode=mode, library=library.name, build_key=library.build_key,
        lattice_A=(float(lattice.a_A), float(lattice.b_A), float(lattice.gamma_deg)), outside_library=outside,
        prototype=prototype, n_compatible=n_compatible, seconds=time.perf_counter() - t0, warnings=tuple(warnings),
    )


# ------------------------------------------------------------------------------------------------------
# beyond the library: element proposals from the column contrast


def propose_elements(library: TemplateLibrary, t: int, mode: str, y, w, g2, *, elements=None, absolute: bool = False) -> dict:
    """Fit one contrast multiplier per species of template ``t`` to the observed amplitudes and turn the
    fitted per-atom contrasts into element proposals (mode-dependent Z-scaling from the fast model).

    Returns ``{"species": {template_element: proposed_element}, "relative_contrast": {...}}``; with
    ``elements`` given, the proposal is the assignment of those elements that best matches the contrast.
    """
    from ase.data import atomic_numbers, chemical_symbols
    from scipy.optimize import least_squares

    from .descriptors import element_response, template_coefficients

    atoms = library.atoms(t)
    mic = library.microscope_for(mode)
    symbols = sorted(set(atoms.get_chemical_symbols()), key=lambda s: -atomic_numbers[s])
    parts = []
    for s in symbols:
        sub = atoms[[a.symbol == s for a in atoms]]
        parts.append(template_coefficients(sub, mic, library.hk))
    C = np.array(parts)  # (S, m)
    ok = w > 0
    yy, ww, gg = np.asarray(y)[ok], np.sqrt(np.asarray(w)[ok]), np.asarray(g2)[ok]
    Cs = C[:, ok]

    def resid(p):
        alpha = np.concatenate([[1.0], np.exp(p[1:len(symbols)])])
        model = np.exp(p[0]) * np.abs(alpha @ Cs) * np.exp(-p[-1] * gg)
        return ww * (model - yy)

    scale0 = float(np.sum(yy * np.abs(Cs.sum(0))) / max(np.sum(np.abs(Cs.sum(0)) ** 2), 1e-300))
    p0 = np.concatenate([[math.log(max(scale0, 1e-300))], np.zeros(len(symbols) - 1), [0.0]])
    fit = least_squares(resid, p0, method="trf")
    alpha = np.concatenate([[1.0], np.exp(fit.x[1:len(symbols)])])
    resp = element_response(mic)
    z0 = [atomic_numbers[s] for s in symbols]
    rel = {s: float(a * resp[z] / resp[z0[0]]) for s, a, z in zip(symbols, alpha, z0)}  # per-atom contrast vs heaviest
    # on an absolute (beam-fraction) scale the fitted per-atom contrast itself identifies the element
    absc = {s: float(math.exp(fit.x[0]) * a * resp[z]) for s, a, z in zip(symbols, alpha, z0)}
    if elements:
        if isinstance(elements, str):
            elements = [e for e in elements.replace(",", " ").split() if e]
        pool = [e.strip().capitalize() for e in elements]
        best = None
        for perm in itertools.permutations(pool, len(symbols)) if len(pool) >= len(symbols) else []:
            r = np.array([resp[atomic_numbers[e]] for e in perm])
            if absolute:
                cost = np.sum((np.log(r) - np.log([absc[s] for s in symbols])) ** 2)
            else:
                cost = np.sum((np.log(r / r[0]) - np.log([rel[s] for s in symbols])) ** 2)
            if best is None or cost < best[0]:
                best = (cost, perm)
        mapping = dict(zip(symbols, best[1])) if best else {s: s for s in symbols}
    else:
        valid = np.isfinite(resp) & (np.arange(len(resp)) > 0)
        mapping = {}
        if absolute:
            cost = np.where(valid, np.abs(np.log(np.where(valid, resp, 1.0) / absc[symbols[0]])), np.inf)
            mapping[symbols[0]] = chemical_symbols[int(np.argmin(cost))]
        else:
            mapping[symbols[0]] = symbols[0]
        ref = resp[atomic_numbers[mapping[symbols[0]]]]
        for s in symbols[1:]:
            target = absc[s] if absolute else rel[s] * resp[z0[0]]
            cost = np.where(valid, np.abs(np.log(np.where(valid, resp, 1.0) / target)), np.inf)
            mapping[s] = chemical_symbols[int(np.argmin(cost))]
    return {"species": mapping, "relative_contrast": rel, "absolute_contrast": absc if absolute else None,
            "anchor": symbols[0], "mode": mode}
