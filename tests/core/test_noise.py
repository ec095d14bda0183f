"""Dose noise and scan distortion: counting statistics, determinism, re-integration."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import mx2

from aiida_automat.errors import SimulationError
from aiida_automat.imaging import Microscope
from aiida_automat.imaging.noise import ScanDistortion, apply_dose, apply_scan_distortion, integrate_dpc
from aiida_automat.imaging.simulate import simulate_image


def mos2():
    return mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=5.0)


@pytest.mark.parametrize("dose", [50.0, 2000.0])
def test_poisson_counts_mean_and_variance(dose):
    rng = np.random.default_rng(1)
    signal = np.full((256, 256), 0.2)
    px = 0.1
    noisy = apply_dose(signal, dose, px, rng)
    electrons = dose * px * px
    assert noisy.mean() == pytest.approx(0.2, rel=0.02)
    # Poisson: var(counts) = mean(counts) → var(signal) = signal / electrons
    assert noisy.var() == pytest.approx(0.2 / electrons, rel=0.05)
    # counts are integers
    assert np.allclose(noisy * electrons, np.round(noisy * electrons))


def test_detector_fraction_and_anisotropic_pixels():
    rng = np.random.default_rng(2)
    noisy = apply_dose(np.full((200, 200), 1.0), 100.0, (0.1, 0.2), rng, detector_fraction=0.5)
    assert noisy.var() == pytest.approx(1.0 / (100 * 0.02 * 0.5), rel=0.05)


def test_dose_needs_generator_and_positive_dose():
    with pytest.raises(SimulationError):
        apply_dose(np.ones((4, 4)), 10.0, 0.1, None)
    with pytest.raises(SimulationError):
        apply_dose(np.ones((4, 4)), -1.0, 0.1, np.random.default_rng(0))


@pytest.mark.parametrize("mode", ["haadf", "idpc", "abf"])
def test_seeded_noise_is_deterministic(mode):
    m = Microscope(mode=mode, voltage_kV=80)
    kw = dict(method="fast", shape=(64, 64), dose_e_per_A2=500.0)
    a = simulate_image(mos2(), m, rng=np.random.default_rng(7), **kw).data
    b = simulate_image(mos2(), m, rng=np.random.default_rng(7), **kw).data
    c = simulate_image(mos2(), m, rng=np.random.default_rng(8), **kw).data
    clean = simulate_image(mos2(), m, method="fast", shape=(64, 64)).data
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, clean)


def test_idpc_noise_falls_with_dose():
    m = Microscope(mode="idpc", voltage_kV=80)
    clean = simulate_image(mos2(), m, method="fast", shape=(96, 96)).data
    err = []
    for dose in (1e3, 1e5):
        noisy = simulate_image(mos2(), m, method="fast", shape=(96, 96), dose_e_per_A2=dose,
                               rng=np.random.default_rng(3)).data
        err.append(np.std(noisy - clean))
    assert err[1] < err[0] / 5  # ∝ 1/√dose: expected factor 10


def test_integrate_dpc_recovers_periodic_function():
    y, x = np.mgrid[:64, :64] * 0.1
    f = np.sin(2 * np.pi * x / 3.2) + 0.5 * np.cos(2 * np.pi * y / 1.6)
    dx = 2 * np.pi / 3.2 * np.cos(2 * np.pi * x / 3.2)
    dy = -0.5 * 2 * np.pi / 1.6 * np.sin(2 * np.pi * y / 1.6)
    assert np.allclose(integrate_dpc(dx, dy, 0.1), f - f.mean(), atol=1e-9)


def test_scan_distortion_validation_and_determinism():
    with pytest.raises(SimulationError):
        ScanDistortion(scale_x=3.0)
    with pytest.raises(SimulationError):
        ScanDistortion(line_jitter_px=-1)
    d = ScanDistortion(shear=0.02, line_jitter_px=0.5, drift_A_per_line=(0.001, 0.0))
    m = Microscope(mode="haadf", voltage_kV=80)
    with pytest.raises(SimulationError, match="rng"):
        simulate_image(mos2(), m, method="fast", shape=(64, 64), distortion=d)
    a = simulate_image(mos2(), m, method="fast", shape=(64, 64), distortion=d, rng=np.random.default_rng(1))
    b = simulate_image(mos2(), m, method="fast", shape=(64, 64), distortion=d, rng=np.random.default_rng(1))
    assert np.array_equal(a.data, b.data)
    assert a.metadata["distortion"]["shear"] == 0.02


def test_apply_scan_distortion_identity_and_shift():
    img = np.random.default_rng(0).random((40, 40))
    same = apply_scan_distortion(img, ScanDistortion(), 0.1)
    assert np.allclose(same, img)
    sheared = apply_scan_distortion(img, ScanDistortion(shear=0.1), 0.1)
    assert not np.allclose(sheared, img)
