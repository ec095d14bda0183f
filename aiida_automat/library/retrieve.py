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
   with the complex coefficients (``phasefit``): the image's DFT at each frame's reflections (= the cell
   average of ``reconstruct.cellavg``) against the template's coefficients × c·exp(-B g²)·exp(-2πi hk·s),
   with the origin shift s found once (coarse FFT grid, then Newton steps) and the blur B scanned finely at
   that shift. This makes the score translation-invariant while keeping the relative phases, i.e. the
   motif: element identity shows in the relative amplitudes *and* phases (in a 2H TMD the phase of the
   first reflections fixes the metal/chalcogen-column ratio, which |F| alone leaves two-fold ambiguous).
   Each reflection is weighted by its noise variance (the spectrum's ring floor) plus a relative model
   error (fast model vs multislice: ~5 % rms in iDPC and in ADF). The χ² runs
   over the union of all candidates' reflections, so sub- and supercell templates are compared on the
   same data.
5. **Calibrated scores**: log-likelihood = −½ χ² / ``CHI2_DISPERSION`` (model errors are correlated) plus
   priors: the pixel-size calibration error (Gaussian in ln scale, σ 5 %, walls beyond ±10 %), which breaks
   ties between element swaps whose lattices differ by a few per cent; the lattice strain; and, for images
   on an absolute scale (fraction of the incident beam), the image/model contrast — a strong element
   signal in iDPC (projected potential), weaker in ADF. Softmax over templates gives the probabilities.
   Limit: element swaps with ΔZ ≈ 1 in the same prototype (MoS2/NbS2, WS2/TaS2, FeI2/CoI2) differ by
   little more than the lattice constant, so within a ±8 % calibration error they stay ambiguous and
   share the probability.
6. **Outside library**: the best candidate's misfit (χ² per reflection with signal, plus the squared
   contrast deviation on absolute-scale images) above ``OUTSIDE_PHASE_CHI2`` flags the image and the best
   *prototype* (anonymous formula + lattice type) is proposed with element assignments from the fitted
   per-species contrast (mode-dependent Z-scaling from the same fast model).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import LibraryError, NoCandidate
from ..imaging.image import StemImage
from ..reconstruct.build import MAX_ANISOTROPY
from .index import TemplateLibrary
from .phasefit import phase_fit, windowed_image

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
#: phase-aware second stage: templates short-listed by the amplitude χ² (80: the amplitude stage alone ranked the
#: true AsBr5 52nd of 184 compatible templates at 3·10⁴ e⁻/Å²; on the 480-image set 40 → 80 → 120 gave top-1
#: 396 → 398 → 398 and top-5 440 → 441 → 441 at a median 0.25 → 0.31 → 0.37 s), frames kept per template, blur grid
#: (Å², scanned at the best shift), shift grid per cell axis, relative model error per reflection (fast model
#: vs abTEM multislice at 300 kV after one contrast and blur, rms of ‖ΔC‖/‖C‖ over the retrieval benchmark's 28
#: true templates: iDPC 5 %; ADF 5 % with the stacked-column annular model of DESCRIPTOR_VERSION 3 — median 1 %,
#: 7–12 % for stacked or thick cells such as MoSe2, TaSe2, LuBrO, GaSe; 15 % was for the old annular model),
#: calibration window on |ln scale| (walls)
N_SHORT = 80
N_FRAMES = 16
B_PHASE = np.linspace(-0.3, 1.0, 27)
SHIFT_GRID = 32
PHASE_MODEL_ERROR = {"adf": 0.05, "haadf": 0.05, "idpc": 0.05, "dpc": 0.05}
CALIB_WINDOW = 0.10
CALIB_SIGMA = 0.025
#: log-likelihood of a candidate: −½ χ² / CHI2_DISPERSION (model errors are correlated across reflections,
#: so χ² differences overstate the evidence by this factor; fitted on the benchmark so that the mean top-1
#: probability matches the top-1 accuracy) plus the priors below; softmax at temperature 1
CHI2_DISPERSION = 4.0
#: prior on the pixel-size calibration error, Gaussian in ln(scale): a calibration is more likely a few per
#: cent off than 8 % off, which breaks ties between element swaps whose lattices differ by a few per cent
CALIB_PRIOR_SIGMA = 0.05
#: images on an absolute scale (fraction of the incident beam): Gaussian prior on ln(image/model contrast).
#: abTEM multislice at 300 kV vs the fast model, over the benchmark's true templates (least-squares contrast at
#: the best blur): iDPC −0.02 ± 0.05 (re-measured 2026-11-22 on 28 templates: −0.03 ± 0.03); ADF −0.06 ± 0.08
#: with the stacked-column annular model (DESCRIPTOR_VERSION 3; the old model gave +0.19 ± 0.14). Widths a
#: little above the measured scatter; a fast-model image (0) stays within 0.6 σ in ADF
ABS_CENTER = {"adf": -0.06, "haadf": -0.06, "idpc": -0.02, "dpc": -0.02}
ABS_SIGMA = {"adf": 0.1, "haadf": 0.1, "idpc": 0.06, "dpc": 0.06}
#: "outside library" threshold on the best candidate's misfit: χ² per reflection with signal, plus the squared
#: contrast deviation (``contrast_z``) for absolute-scale images. On the benchmark, in-library images stay below
#: 5.3 except when the true template is missing from the short list
OUTSIDE_PHASE_CHI2 = 6.0
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
    chi2_signal: float = float("nan")  # χ² per reflection over the reflections with signal (nan: amplitude-only)

    def as_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["elements"] = list(self.elements)
        d["supercell"] = [list(r) for r in self.supercell]
        d["frame"] = [list(r) for r in self.frame]
        d["shift"] = list(self.shift)
        d["ncc"] = float(self.ncc) if math.isfinite(self.ncc) else None  # JSON/AiiDA-safe
        d["chi2_signal"] = float(self.chi2_signal) if math.isfinite(self.chi2_signal) else None
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
        floor = self.noise_power(f_xy)
        amp = np.sqrt(np.clip(pm - 2.83 * floor, 0.0, None))
        sigma = np.sqrt(0.5 * floor)
        return amp, sigma, valid

    def noise_power(self, f_xy: np.ndarray) -> np.ndarray:
        """Expected |DFT|² of the noise alone at frequencies ``f_xy`` (..., 2) in cycles/px (the ring floor)."""
        py, px = self.pad
        rad = np.hypot(f_xy[..., 1] * py, f_xy[..., 0] * px)
        ring = np.clip((rad / self._ring_width).astype(np.int64), 0, len(self._ring) - 1)
        return self._ring[ring]


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


def _anisotropy(template_A: np.ndarray, frame_A: np.ndarray) -> np.ndarray:
    """(templates, frames) anisotropic part ½|s₁ − s₂| of the stretch that maps each template cell onto each
    frame — the quantity ``reconstruct.build`` refuses above ``MAX_ANISOTROPY``. A pair beyond it can never
    become a structure, so it must not take a place among the candidates (measured: on an AsBr5 iDPC image
    6 of the 15 candidates were 10–13 % misfits that the reconstruction then refused one by one).

    s₁², s₂² are the eigenvalues of G_t⁻¹ G_f (G: Gram matrices of the bases, same index order)."""
    Gt = template_A @ np.swapaxes(template_A, -1, -2)
    Gf = frame_A @ np.swapaxes(frame_A, -1, -2)
    inv = np.linalg.inv(Gt)
    # tr(G_t⁻¹ G_f) of symmetric matrices is a dot product of (g₀₀, 2g₀₁, g₁₁) with (h₀₀, h₀₁, h₁₁)
    tr = np.stack([inv[:, 0, 0], 2.0 * inv[:, 0, 1], inv[:, 1, 1]], axis=1) @ np.stack([Gf[:, 0, 0], Gf[:, 0, 1], Gf[:, 1, 1]])
    det = np.clip(np.outer(1.0 / np.linalg.det(Gt), np.linalg.det(Gf)), 0.0, None)
    return 0.5 * np.sqrt(np.clip(tr - 2.0 * np.sqrt(det), 0.0, None))


def _metric_features(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised metric (G11, G22, G12)/tr(G) and tr(G) for bases (..., 2, 2)."""
    G = A @ np.swapaxes(A, -1, -2)
    tr = G[..., 0, 0] + G[..., 1, 1]
    feat = np.stack([G[..., 0, 0], G[..., 1, 1], G[..., 0, 1]], axis=-1) / tr[..., None]
    return feat, tr


# ------------------------------------------------------------------------------------------------------
# retrieval


def contrast_z(contrast, mode: str) -> np.ndarray:
    """Deviation of ln(image/model contrast) from its expected value, in prior widths (absolute-scale images)."""
    return (np.log(np.maximum(contrast, 1e-12)) - ABS_CENTER.get(mode, 0.0)) / ABS_SIGMA.get(mode, 0.4)


def phase_loglik(chi2, scale, strain, contrast, mode: str) -> np.ndarray:
    """Log-likelihood of phase-stage candidates: data term + calibration, strain and (for images on an
    absolute scale, ``contrast`` given) contrast priors; see the constants above."""
    lns = np.log(scale)
    excess = np.maximum(np.abs(lns) - CALIB_WINDOW, 0.0) / CALIB_SIGMA
    ll = -0.5 * np.asarray(chi2) / CHI2_DISPERSION - 0.5 * (excess**2 + (lns / CALIB_PRIOR_SIGMA) ** 2 + (strain / STRAIN_SIGMA) ** 2)
    if contrast is not None:
        ll = ll - 0.5 * contrast_z(contrast, mode) ** 2
    return ll


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
    compat &= _anisotropy(library.cells_2d, FA) <= MAX_ANISOTROPY
    ti, fi = np.nonzero(compat)
    if len(ti) == 0:
        raise NoCandidate(
            f"no template has a lattice compatible with the measured one (a={lattice.a_A:.3f} Å, b={lattice.b_A:.3f} Å, "
            f"γ={lattice.gamma_deg:.1f}°) within ±{SCALE_TOL:.0%} scale, {STRAIN_TOL:.0%} strain and {MAX_ANISOTROPY:.0%} "
            "anisotropy"
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
    if not calibrated and not elements:
        warnings.append(
            "the image's intensities are not in fractions of the incident beam, so templates that image alike but "
            "scatter very differently (h-AlN and 2H-MoS2 in HAADF; docs/benchmarks.md, real experimental images) cannot "
            "be told apart: give the elements if they are known (--elements)"
        )
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
    chi2_sig = np.full(len(ti), np.nan)
    misfit = chi2_red
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
        fit = phase_fit(windowed_image(image), spec, A_px, T, ti, fi, library.coefficients[mode], library.hk, g_A, sc,
                        g_lim, model_error=PHASE_MODEL_ERROR.get(mode, 0.1), b_grid=B_PHASE, shift_grid=SHIFT_GRID)
        chi2_red, ncc, best_B, best_c, shifts = fit.chi2 / fit.n_points, fit.ncc, fit.B, fit.contrast, fit.shift
        chi2_sig = fit.chi2_signal / fit.n_signal
        loglik = phase_loglik(fit.chi2, sc, st, best_c if calibrated else None, mode)
        misfit = chi2_sig + (contrast_z(best_c, mode) ** 2 if calibrated else 0.0)
    # best frame per template
    order = np.lexsort((-loglik, ti))
    first = np.ones(len(order), dtype=bool)
    first[1:] = ti[order][1:] != ti[order][:-1]
    pick = order[first]
    pick = pick[np.argsort(-loglik[pick])]
    n_compatible = n_compat_templates
    ll = loglik[pick]
    temperature = 1.0 if phase else TEMPERATURE
    prob = np.exp((ll - ll.max()) / temperature)
    prob /= prob.sum()

    def make(rank, p, pr, outside=False, proposal=None):
        t = int(ti[p])
        Tm = T[fi[p]]
        return Candidate(
            rank=rank, template_id=str(library.ids[t]), index=t, formula=str(library.formulas[t]),
            anonymous_formula=str(library.anonymous[t]), lattice_type=str(library.lattice_types[t]),
            elements=tuple(str(library.elements[t]).split()), probability=float(pr),
            quality=float(1.0 / (1.0 + max(misfit[p] - 1.0, 0.0) / 5.0)), chi2_red=float(chi2_red[p]),
            lattice_strain=float(st[p]), scale=float(sc[p]), b_factor_A2=float(best_B[p]), contrast_scale=float(best_c[p]),
            supercell=tuple(tuple(int(v) for v in r) for r in Tm),
            frame=tuple(tuple(float(v) for v in r) for r in (Tm.astype(float) @ np.asarray(lattice.vectors_px, float))),
            outside_library=outside, proposed_elements=proposal, ncc=float(ncc[p]),
            shift=(float(shifts[p][0]), float(shifts[p][1])), chi2_signal=float(chi2_sig[p]),
        )

    threshold = (OUTSIDE_PHASE_CHI2 if phase else OUTSIDE_CHI2) if outside_chi2 is None else float(outside_chi2)
    outside = bool(misfit[pick[0]] > threshold)
    # library candidates stay library candidates (``outside_library`` False) even when the image is flagged:
    # the flag is the result's, and the fallback proposal is ``prototype``
    cands = tuple(make(r + 1, p, prob[r]) for r, p in enumerate(pick[:k]))
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
            f"no template fits well (best misfit {misfit[p]:.1f} > {threshold:g}); the structure may be outside "
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
