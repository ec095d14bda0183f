"""Complex lattice-coefficient fit of template candidates to one image (retrieval's scoring stage).

A periodic image is its Fourier series over the lattice, so the image's DFT at the reflections of a
candidate cell (= the cell average of ``reconstruct.cellavg``) is compared with the template's fast-model
coefficients C(h, k). The model of the observed coefficient is

    M(h, k) = a · C(h, k) · exp(-B g²) · exp(-2πi (h, k)·s)

with a free contrast a ≥ 0, blur B (probe/source/thermal envelope mismatch between the fast model and the
image) and origin shift s (translation). The element identity of a structure is in the *relative*
amplitudes and phases of its reflections (heavy vs light columns: Z^~1.7 in ADF, projected potential in
iDPC), so all of them are fitted at once, each weighted by its noise: the variance of a DFT value of the
windowed image is the spectrum's noise floor at that |k| (``ObservedSpectrum``), plus a relative model
error (the fast model matches multislice to a few per cent). χ² is summed over the *union* of all
candidates' reflections, so sub- and supercell templates are compared on the same data: a reflection that
a template does not have counts as residual, one it predicts but the image lacks counts too.

Cost: the shift is found once per candidate (a coarse FFT grid of the cross-correlation, then Newton
steps) at a typical blur; the blur is then scanned finely at that shift (the best shift hardly depends on
a real, centro-symmetric envelope) and the shift polished at the best blur. Vectorised over candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PhaseFit", "dft_at", "phase_fit", "windowed_image"]

#: Friedel pairs and fractional (sub-cell) indices are merged on a 1/12 grid of observed-basis indices
_KEY_DENOM = 12.0


def windowed_image(image) -> np.ndarray:
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


@dataclass(frozen=True)
class PhaseFit:
    """Per candidate: ``chi2`` (weighted χ² over the common reflection set of ``n_points``), ``chi2_signal``
    (the same over the ``n_signal`` reflections the image shows above 3σ: the goodness of fit where there
    is something to fit, not diluted by noise-only reflections), the normalised correlation ``ncc`` on its
    own reflections, blur ``B`` (Å²), ``contrast`` (image = contrast × model, in image units per template
    unit) and the fractional origin ``shift``."""

    chi2: np.ndarray
    n_points: int
    chi2_signal: np.ndarray
    n_signal: int
    ncc: np.ndarray
    B: np.ndarray
    contrast: np.ndarray
    shift: np.ndarray


def _newton_shift(X: np.ndarray, s: np.ndarray, hkf: np.ndarray, steps: int, max_step: float) -> np.ndarray:
    """Maximise Re Σ X e^{2πi hk·s} over s by Newton steps (per candidate; non-concave points keep s)."""
    for _ in range(steps):
        Xe = X * np.exp(2j * np.pi * (s @ hkf.T))
        grad = np.real(1j * 2 * np.pi * Xe @ hkf)
        H = -4 * np.pi**2 * np.einsum("km,ma,mb->kab", np.real(Xe), hkf, hkf)
        det = H[:, 0, 0] * H[:, 1, 1] - H[:, 0, 1] ** 2
        good = (H[:, 0, 0] < 0) & (det > 0)
        Hs = np.where(good[:, None, None], H, -np.eye(2)[None] * 1e6)
        step = np.clip(-np.linalg.solve(Hs, grad[..., None])[..., 0], -max_step, max_step)
        s = s + np.where(good[:, None], step, 0.0)
    return s


def phase_fit(fw, spec, A_px, T, pt, pf, coeffs, hk, g_A, scale, g_lim, *, model_error: float,
              b_grid: np.ndarray, b_shift: float = 0.2, shift_grid: int = 32) -> PhaseFit:
    """Fit every (template ``pt[k]``, frame ``T[pf[k]]``) pair (see the module doc).

    ``A_px``: observed basis (x, y) in px; ``coeffs``: (n_templates, m) template coefficients on ``hk``;
    ``g_A``: (frames, m) |g| in nominal 1/Å; ``scale``: true/nominal Å per pair (for the blur's |g|).
    """
    K, m = len(pt), len(hk)
    Tf = T[pf].astype(float)
    Tinv_T = np.transpose(np.linalg.inv(Tf), (0, 2, 1))
    h_obs = np.einsum("mi,kij->kmj", hk.astype(float), Tinv_T)  # template index -> observed-basis index
    key = np.rint(_KEY_DENOM * h_obs).astype(np.int64)
    first = np.where(key[..., 0] != 0, key[..., 0], key[..., 1])
    sign = np.where(first > 0, 1, -1)
    canon = key * sign[..., None]
    B_obs = np.linalg.inv(A_px).T
    f_all = (canon / _KEY_DENOM) @ B_obs
    ok = (g_A[pf] <= g_lim) & np.all(np.abs(f_all) < 0.5, axis=-1)
    flat = canon[ok]
    uniq, inv = np.unique(flat[:, 0] * 100003 + flat[:, 1], return_inverse=True)
    rep = np.zeros(len(uniq), dtype=np.int64)
    rep[inv] = np.arange(len(flat))
    f_u = (flat[rep] / _KEY_DENOM) @ B_obs
    O_u = dft_at(fw, f_u)
    var_u = spec.noise_power(f_u)
    a2 = np.abs(O_u) ** 2
    w_u = 1.0 / (var_u + model_error**2 * a2 + 1e-300)
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
    hkf = hk.astype(float)

    # 1. origin shift at a typical blur: coarse FFT grid of the cross-correlation, then Newton steps
    G = shift_grid
    grid = np.zeros((K, G, G), dtype=complex)
    grid[:, np.mod(hk[:, 0], G), np.mod(hk[:, 1], G)] = X0 * np.exp(-b_shift * g2)
    corr_grid = np.real(np.fft.ifft2(grid)) * (G * G)
    j = np.argmax(corr_grid.reshape(K, -1), axis=1)
    s = np.stack([j // G, j % G], axis=1) / G
    s = _newton_shift(X0 * np.exp(-b_shift * g2), s, hkf, 3, 0.5 / G)

    # 2. blur scan at that shift (one (n_B, K, m) pass), 3. shift polished at the best blur
    def scan(s):
        Y = X0 * np.exp(2j * np.pi * (s @ hkf.T))
        env = np.exp(-np.asarray(b_grid)[:, None, None] * g2[None])
        corr = np.real(np.sum(Y[None] * env, axis=2))
        mm = np.sum((w * np.abs(M) ** 2)[None] * env**2, axis=2) + 1e-300
        gain = np.maximum(corr, 0.0) ** 2 / mm
        jb = np.argmax(gain, axis=0)
        ar = np.arange(K)
        return np.asarray(b_grid)[jb], corr[jb, ar], mm[jb, ar], gain[jb, ar]

    Bbest, _, _, _ = scan(s)
    s = _newton_shift(X0 * np.exp(-Bbest[:, None] * g2), s, hkf, 2, 0.5 / G)
    Bbest, corr, mm, gain = scan(s)
    own = np.sum(w * np.abs(O) ** 2, axis=1) + 1e-300
    # goodness of fit on the reflections with signal: explicit residuals of the fitted model
    strong_u = a2 > 9.0 * var_u
    strong = np.zeros((K, m), dtype=bool)
    strong[ok] = strong_u[inv]
    amp = np.maximum(corr, 0.0) / mm
    model = amp[:, None] * M * np.exp(-Bbest[:, None] * g2 - 2j * np.pi * (s @ hkf.T))
    explained = np.sum(np.where(strong, w * (np.abs(O) ** 2 - np.abs(O - model) ** 2), 0.0), axis=1)
    chi2_signal = float(np.sum(w_u * a2 * strong_u)) - explained
    return PhaseFit(chi2=total - gain, n_points=n_pts, chi2_signal=chi2_signal, n_signal=max(int(strong_u.sum()), 1),
                    ncc=corr / np.sqrt(own * mm), B=Bbest, contrast=amp / spec.window_sum, shift=np.mod(s, 1.0))
