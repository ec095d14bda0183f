"""The ranking score of one candidate structure: the number the agent compares candidates by.

One function for the WorkChain's ``verify_candidate`` calcfunction and the in-process benchmark loop, so the
product and its benchmark cannot rank candidates differently. The structure is registered afresh, without
refinement and with physical column contrast (only the instrument blur is fitted), so the score judges the
output structure itself, not the fit that produced it. Two mild penalties are subtracted from the verification
NCC, each for something the scale-free NCC cannot see:

* the strain the template needed (``STRAIN_WEIGHT``, ``reconstruct.verify``);
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
    strain = float(abs(template_strain))
    penalty = STRAIN_WEIGHT * max(0.0, strain - STRAIN_FREE)
    c_penalty = contrast_penalty(ver.contrast, image.microscope.mode.lower()) if is_calibrated(image) else 0.0
    return {"score": float(ver.score), "real_space_ncc": float(ver.real_space_ncc),
            "residual_rms_rel": float(ver.residual_rms), "template_strain": strain, "strain_penalty": penalty,
            "contrast": float(ver.contrast), "contrast_penalty": c_penalty,
            "ranking_score": float(ver.score) - penalty - c_penalty}
