"""Candidate ranking score: the absolute-contrast term on images in beam fractions."""

import numpy as np
import pytest
from ase.build import mx2

from aiida_automat.agent.state import RETRIEVAL_WEIGHT
from aiida_automat.imaging import Microscope
from aiida_automat.imaging.fastsim import fast_image
from aiida_automat.lattice.measure import measure_lattice
from aiida_automat.reconstruct.pipeline import reconstruct
from aiida_automat.reconstruct.scoring import (CONTRAST_CENTER, CONTRAST_MAX_NATS, CONTRAST_SIGMA, CONTRAST_WEIGHT,
                                               candidate_score, contrast_penalty, is_calibrated)

MOS2 = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10)
WS2 = mx2(formula="WS2", kind="2H", a=3.18, thickness=3.14, vacuum=10)


@pytest.fixture(scope="module")
def adf_mos2():
    img = fast_image(MOS2, Microscope(mode="adf"), pixel_size_A=0.1, shape=(160, 160), rotation_deg=9.0,
                     dose_e_per_A2=3e4, rng=np.random.default_rng(5))
    return img, measure_lattice(img)


def _score(img, lat, atoms):
    rec = reconstruct(img, atoms, lat.vectors_px)
    return candidate_score(img, lat.vectors_px, rec.atoms)


def test_heavier_look_alike_pays_for_its_contrast(adf_mos2):
    """WS2's pattern fits a MoS2 image, but its W columns would make a calibrated image far brighter."""
    img, lat = adf_mos2
    assert is_calibrated(img)
    right, heavy = _score(img, lat, MOS2), _score(img, lat, WS2)
    assert abs(np.log(right["contrast"])) < 0.05  # the fast model explains its own image at scale 1
    assert heavy["contrast"] < 0.8  # the image is dimmer than WS2 would be
    assert right["contrast_penalty"] < 0.2 * CONTRAST_WEIGHT
    assert heavy["contrast_penalty"] == pytest.approx(CONTRAST_WEIGHT * CONTRAST_MAX_NATS)  # excluded: the cap
    assert heavy["ranking_score"] == pytest.approx(heavy["score"] - heavy["strain_penalty"] - heavy["contrast_penalty"])
    assert right["ranking_score"] > heavy["ranking_score"]


def test_uncalibrated_image_has_no_contrast_term(adf_mos2):
    """An image in detector counts says nothing about absolute brightness: no penalty, whatever the contrast."""
    img, lat = adf_mos2
    counts = img.replace(metadata={**img.metadata, "units": "counts"})
    assert not is_calibrated(counts)
    heavy = _score(counts, lat, WS2)
    assert heavy["contrast"] < 0.8 and heavy["contrast_penalty"] == 0.0
    assert heavy["ranking_score"] == pytest.approx(heavy["score"] - heavy["strain_penalty"])


def test_contrast_penalty_is_a_log_likelihood():
    assert CONTRAST_WEIGHT == RETRIEVAL_WEIGHT
    mu = CONTRAST_CENTER["adf"]
    assert contrast_penalty(np.exp(mu), "adf") == 0.0
    assert contrast_penalty(0.0, "adf") == 0.0 and contrast_penalty(-1.0, "adf") == 0.0
    assert contrast_penalty(0.5, "abf") == 0.0  # no measured centre for this mode
    # symmetric in ln c about the measured centre and quadratic
    assert contrast_penalty(np.exp(mu + 0.14), "adf") == pytest.approx(contrast_penalty(np.exp(mu - 0.14), "adf"))
    assert contrast_penalty(np.exp(mu + 0.2), "adf") == pytest.approx(4 * contrast_penalty(np.exp(mu + 0.1), "adf"),
                                                                       rel=1e-3)
    assert contrast_penalty(np.exp(mu + 0.14), "adf") == pytest.approx(
        CONTRAST_WEIGHT * 0.5 * (0.14 / CONTRAST_SIGMA["adf"]) ** 2, rel=1e-4)
    # capped: no contrast, however far off, costs more than a 10⁻⁶ likelihood ratio
    assert contrast_penalty(0.01, "adf") == pytest.approx(contrast_penalty(100.0, "adf"))
    assert contrast_penalty(0.01, "adf") == pytest.approx(CONTRAST_WEIGHT * np.log(1e6), rel=1e-4)


def test_idpc_contrast_likelihood_is_robust_to_its_measured_tail():
    """iDPC's right answers have a 4.4 % tail (light layers): far in it, a right answer pays a few nats, not the
    10⁻⁶ cap that would hand the image to a look-alike; inside the core the term is the same Gaussian as ADF's."""
    mu, sigma = CONTRAST_CENTER["idpc"], CONTRAST_SIGMA["idpc"]
    core = contrast_penalty(np.exp(mu + sigma), "idpc") / CONTRAST_WEIGHT
    assert 0.45 < core < 0.5  # ½z² at z = 1, barely touched by the outlier component
    tail = [contrast_penalty(np.exp(mu + k * sigma), "idpc") / CONTRAST_WEIGHT for k in (4, 8, 16)]
    assert 3.0 < tail[0] < tail[1] < 6.0 and tail[2] == pytest.approx(tail[1], abs=1e-3)  # saturated
    assert tail[1] < 0.5 * CONTRAST_MAX_NATS
    # the same contrast in ADF (no tail measured) is excluded
    assert contrast_penalty(np.exp(8 * sigma), "adf") > contrast_penalty(np.exp(mu + 8 * sigma), "idpc")
    # the Gaussian limit: no outliers → ½z² up to the cap
    g = contrast_penalty(np.exp(mu + 4 * sigma), "idpc", outliers=0.0) / CONTRAST_WEIGHT
    assert g == pytest.approx(8.0, rel=1e-3)


def _sublattice(img):
    """The MoS2 sub-lattice of an image, whether the measurement found it or its 2×2 superstructure."""
    lat = measure_lattice(img)
    return lat.vectors_px if lat.a_A < 4.0 else lat.vectors_px / 2.0


@pytest.mark.parametrize("mode", ["haadf", "idpc"])
def test_one_crystal_in_two_cells_ranks_alike(mode):
    """MoS2 described in its 2×2 cell is the same crystal: the noise on the extra harmonics must not rank it
    lower (the plain verification NCC does, by ~0.01 at 10³ e⁻/Å²)."""
    img = fast_image(MOS2, Microscope(mode=mode, voltage_kV=80.0, semiangle_mrad=30.0), pixel_size_A=0.1,
                     shape=(256, 256), rotation_deg=17.0, dose_e_per_A2=1e3, rng=np.random.default_rng(1))
    M = _sublattice(img)
    prim, big = candidate_score(img, M, MOS2), candidate_score(img, M, MOS2.repeat((2, 2, 1)))
    assert prim["score"] - big["score"] > 0.01  # what the size-neutral score corrects
    assert prim["size_neutral_score"] == pytest.approx(prim["score"], abs=1e-12)  # a template on the measured cell: unchanged
    assert abs(big["size_neutral_score"] - prim["size_neutral_score"]) < 1e-3
    assert big["ranking_score"] == pytest.approx(big["size_neutral_score"] - big["strain_penalty"] - big["contrast_penalty"])


@pytest.mark.parametrize("mode", ["haadf", "idpc"])
@pytest.mark.parametrize("seed", [1, 2])
def test_superstructure_the_image_shows_outranks_its_sub_cell(mode, seed):
    """One S in four replaced by Se, ordered on a 2×2 cell, imaged at 3·10³ e⁻/Å² on the MoS2 sub-lattice: the
    plain NCC prefers plain MoS2 (fewer noisy harmonics), the ranking score the ordered crystal that was imaged."""
    ordered = MOS2.repeat((2, 2, 1))
    symbols = ordered.get_chemical_symbols()
    symbols[1] = "Se"
    ordered.set_chemical_symbols(symbols)
    img = fast_image(ordered, Microscope(mode=mode, voltage_kV=80.0, semiangle_mrad=30.0), pixel_size_A=0.1,
                     shape=(256, 256), rotation_deg=17.0, dose_e_per_A2=3e3, rng=np.random.default_rng(seed))
    M = _sublattice(img)
    plain, truth = candidate_score(img, M, MOS2), candidate_score(img, M, ordered)
    assert plain["score"] > truth["score"]
    assert truth["ranking_score"] > plain["ranking_score"] + 0.003


def test_calibration_error_the_image_declares_costs_the_right_template_nothing(adf_mos2):
    """A pixel size stated 6 % too small makes MoS2 look 6 % strained: charged as strain when the calibration is
    exact, free when the image says its pixel size is only good to ±8 %."""
    img, _ = adf_mos2
    off = img.replace(pixel_size_A=tuple(0.94 * p for p in img.pixel_size_A))
    loose = off.replace(metadata={**off.metadata, "pixel_size_tolerance": 0.08})
    assert off.pixel_size_tolerance == 0.0 and loose.pixel_size_tolerance == 0.08
    from aiida_automat.bench.pipeline import ranking_score  # what the WorkChain's verify_candidate computes

    def score(image):
        lat = measure_lattice(image)
        return ranking_score(image, lat.vectors_px, reconstruct(image, MOS2, lat.vectors_px))

    strict_score, loose_score = score(off), score(loose)
    assert strict_score["template_strain"] == pytest.approx(0.06, abs=0.01)
    assert strict_score["strain_penalty"] > 0.02
    assert loose_score["strain_penalty"] == 0.0
    assert loose_score["ranking_score"] - strict_score["ranking_score"] == pytest.approx(strict_score["strain_penalty"], abs=1e-6)


def test_pixel_size_tolerance_defaults():
    """Simulations know their pixel size; an image from anywhere else is taken as good to ±5 %."""
    from aiida_automat.imaging.image import DEFAULT_PIXEL_SIZE_TOLERANCE, StemImage

    sim = fast_image(MOS2, Microscope(mode="adf"), pixel_size_A=0.1, shape=(64, 64))
    assert sim.metadata["pixel_size_tolerance"] == 0.0 and sim.pixel_size_tolerance == 0.0
    real = StemImage(data=np.asarray(sim.data), pixel_size_A=0.1, microscope=sim.microscope, source="scope.tif")
    assert real.pixel_size_tolerance == DEFAULT_PIXEL_SIZE_TOLERANCE == 0.05
    assert real.replace(metadata={"pixel_size_tolerance": -0.02}).pixel_size_tolerance == 0.02
    from aiida_automat.errors import ImageError

    for bad in ("5%", 1.5, float("nan")):
        with pytest.raises(ImageError, match="pixel_size_tolerance"):
            real.replace(metadata={"pixel_size_tolerance": bad}).validate()
