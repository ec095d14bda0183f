"""The ranking score of one candidate structure: the number the agent compares candidates by.

One function for the WorkChain's ``verify_candidate`` calcfunction and the in-process benchmark loop, so the
product and its benchmark cannot rank candidates differently. The structure is registered afresh, without
refinement and with physical column contrast (only the instrument blur is fitted), so the score judges the
output structure itself, not the fit that produced it. The NCC is taken with the data norm of the measured
lattice (``size_neutral_ncc``), so that templates with cells of different sizes are judged on the same data. Two
mild penalties are subtracted, each for something the scale-free NCC cannot see:

* the isotropic strain the template needed beyond what the pixel-size tolerance explains (``strain_penalty``);
* on images in physical units (fraction of the incident beam), an absolute contrast that the structure could not
  produce (``CONTRAST_WEIGHT``): a look-alike with heavier or lighter columns images with the right pattern but
  the wrong brightness.
"""

from __future__ import annotations

import math

import numpy as np

from .verify import STRAIN_FREE, STRAIN_WEIGHT, verify

#: ln(image/model contrast) of the verification fit for the right structure on images in beam fractions: centre
#: and spread of its Gaussian core, abTEM multislice vs the fast model, measured on the right answers of the
#: 480-image benchmark (``benchmarks/contrast_selection.py``; session 9: the set made with converged multislice,
#: version 2, and the iDPC model's segments where the image had them). ADF: median +0.005, sd 0.059 over the
#: right answers of 240 images, no tail. iDPC: median −0.016, core width 0.031 (1.4826 × MAD, 240 images) and a
#: tail of 4.4 % beyond 3 core widths (the earlier set's under-converged iDPC and the detector's direction
#: dependence, both gone, had made it 6.5 %; what is left: a few light layers — Si, CaB₂H₂, P), so a plain
#: Gaussian of the sd would exclude right answers. Only measured modes get a term.
CONTRAST_CENTER = {"adf": 0.005, "idpc": -0.016}
CONTRAST_SIGMA = {"adf": 0.06, "idpc": 0.031}
#: fraction of right answers outside the core (the robust likelihood's outlier component, spread uniformly over
#: ``CONTRAST_OUTLIER_RANGE`` in ln c): a right answer in the tail costs at most ~ln(1/(f·σ·√(2π)/range)) nats
CONTRAST_OUTLIERS = {"adf": 0.0, "idpc": 0.044}
CONTRAST_OUTLIER_RANGE = 1.0
#: ranking penalty per unit of log-likelihood: the weight the agent gives the retrieval posterior
#: (``agent.state.RETRIEVAL_WEIGHT``), so that both pieces of intensity evidence count alike
CONTRAST_WEIGHT = 0.002
#: the penalty stops at a likelihood ratio of 10⁻⁶, where the agent also floors the retrieval posterior: a contrast
#: 2× off (WS₂ on a MoS₂ image) is as excluded as one 1.3× off, and a mis-stated calibration cannot cost more
CONTRAST_MAX_NATS = math.log(1e6)


def is_calibrated(image) -> bool:
    """Whether the image's intensities are in fractions of the incident beam (simulations, calibrated detectors)."""
    return str(image.metadata.get("units", "")).startswith("fraction of incident beam")


def contrast_penalty(contrast: float, mode: str, *, center: float | None = None, sigma: float | None = None,
                     outliers: float | None = None) -> float:
    """Ranking penalty ``CONTRAST_WEIGHT`` × (−ln L) for the absolute contrast c, with L the robust likelihood
    (1 − f)·exp(−z²/2) + ε of z = (ln c − centre)/σ, normalised to 0 at z = 0: ½z² in the core, saturating
    where the outlier component ε = max(f·σ·√(2π)/range, 10⁻⁶) takes over (``CONTRAST_MAX_NATS`` for f = 0).
    ``center``/``sigma``/``outliers`` given: those instead of ``mode``'s, as ``benchmarks/contrast_selection.py``
    scans them.

    0 for modes without a measured centre, and for a non-positive contrast, whose negative NCC rejects it anyway.
    """
    if (center is None and mode not in CONTRAST_CENTER) or not contrast > 0.0:
        return 0.0
    center = CONTRAST_CENTER[mode] if center is None else center
    sigma = CONTRAST_SIGMA[mode] if sigma is None else sigma
    f = CONTRAST_OUTLIERS.get(mode, 0.0) if outliers is None else outliers
    eps = max(f * sigma * math.sqrt(2.0 * math.pi) / CONTRAST_OUTLIER_RANGE, math.exp(-CONTRAST_MAX_NATS))
    z = (math.log(contrast) - center) / sigma
    nats = -math.log((1.0 - f) * math.exp(-0.5 * min(z * z, 1e3)) + eps) + math.log(1.0 - f + eps)
    return CONTRAST_WEIGHT * nats


def strain_penalty(strain: float, pixel_size_tolerance: float = 0.0) -> float:
    """Ranking penalty for the isotropic strain a template needed, beyond what the calibration may explain.

    A uniformly larger or smaller lattice is strain or a wrong pixel size, and the image cannot tell which: of the
    mismatch, ``pixel_size_tolerance`` (``StemImage.pixel_size_tolerance``) is free, the rest pays
    ``STRAIN_WEIGHT`` beyond ``STRAIN_FREE``. With an exact calibration this separates look-alikes whose lattices
    differ by a few per cent (h-AlN vs 2H-MoS2); with an image ±8 % off it must not: charged in full, a 6 %
    calibration error cost the right template 0.03 and handed AlP's image to FeSe (retrieval benchmark).
    """
    return STRAIN_WEIGHT * max(0.0, abs(float(strain)) - STRAIN_FREE - abs(float(pixel_size_tolerance)))


def size_neutral_ncc(ncc: float, cell, measured_px) -> float:
    """The verification NCC with the data norm of the measured lattice's harmonics only.

    A template whose cell is a supercell of the measured one is verified on more harmonics, and the NCC's data
    norm counts every one of them, signal or noise, against the template: a crystal described in its 2×2 cell
    scored below the same crystal in its primitive cell at low dose, and g-C₃N₄ (a 2×2 superstructure of a BN-like
    sub-lattice) lost to BN at 3·10³ e⁻/Å². What a template explains, NCC²·(its data norm), is comparable across
    cell sizes (the harmonics it shares with another cell average are the same numbers); dividing it by the norm
    on the measured lattice's harmonics alone makes the two descriptions of one crystal score alike, lets a
    template's predicted superstructure count for it where the image shows it and against it where it does not
    (a predicted reflection the data lack lowers the explained part), and leaves every template on the measured
    cell unchanged. Above 1 by what superstructure signal the template explains beyond the measured cell's.
    """
    S = np.asarray(cell.vectors_px, dtype=float) @ np.linalg.inv(np.asarray(measured_px, dtype=float))
    q = np.asarray(cell.hk, dtype=float) @ np.linalg.inv(S).T  # the harmonics' indices in the measured basis
    on_measured = np.all(np.abs(q - np.rint(q)) < 1e-6, axis=1)
    power = np.abs(cell.coeffs) ** 2 / np.maximum(np.asarray(cell.sigma, dtype=float), 1e-30) ** 2
    p_measured = float(power[on_measured].sum())
    if not (ncc > 0.0 and p_measured > 0.0):
        return float(ncc)
    return float(math.sqrt(ncc * ncc * float(power.sum()) / p_measured))


def registered_candidate(image, lattice_vectors_px, atoms):
    """The observed average cell and the unrefined registration of ``atoms`` that the score is computed from."""
    from .registration import best_registration, lattice_options

    res = max(0.5, 1.1 * image.microscope.resolution_A / 2.0)
    options = lattice_options(np.asarray(lattice_vectors_px, dtype=float), image.pixel_size_A, atoms, shape_tol=0.2)
    reg, cell, *_ = best_registration(image, options, atoms, resolution_A=res, refine=False, shape_tol=0.2)
    return cell, reg


def candidate_score(image, lattice_vectors_px, atoms, template_strain: float = 0.0) -> dict:
    """Verification of ``atoms`` against ``image`` at the measured lattice, and its ranking score."""
    cell, reg = registered_candidate(image, lattice_vectors_px, atoms)
    ver = verify(image, cell, reg, fit_blur=True)
    fair = size_neutral_ncc(ver.score, cell, lattice_vectors_px)
    strain = float(abs(template_strain))
    penalty = strain_penalty(strain, image.pixel_size_tolerance)
    c_penalty = contrast_penalty(ver.contrast, image.microscope.mode.lower()) if is_calibrated(image) else 0.0
    return {"score": float(ver.score), "real_space_ncc": float(ver.real_space_ncc),
            "residual_rms_rel": float(ver.residual_rms), "template_strain": strain, "strain_penalty": penalty,
            "contrast": float(ver.contrast), "contrast_penalty": c_penalty,
            "size_neutral_score": fair, "ranking_score": fair - penalty - c_penalty}
