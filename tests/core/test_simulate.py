"""abTEM multislice through ``simulate_image``: lattice geometry, agreement with the fast model, cache.

Run at 80 kV (the usual voltage for 2D materials): the potential grid and the scan are ~40× smaller
than at 300 kV, so each cell simulation takes a few seconds on one core.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from ase.build import graphene

from aiida_automat.imaging import Microscope
from aiida_automat.imaging.simulate import multislice_cell_coefficients, simulate_image

from .test_fastsim import D100, fft_peaks, mos2

pytestmark = pytest.mark.slow


def ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def hbn():
    return graphene(formula="BN", a=2.50, vacuum=5.0)


@pytest.mark.parametrize("mode", ["idpc", "haadf"])
def test_multislice_fft_peaks_and_rotation(mode):
    m = Microscope(mode=mode, voltage_kV=80)
    img = simulate_image(mos2(), m, pixel_size_A=0.1, shape=(128, 128))
    assert img.metadata["method"] == "multislice" and img.data.dtype == np.float32
    q = fft_peaks(img.data, 0.1, 1 / D100)
    d = 1 / np.linalg.norm(q, axis=1)
    assert np.all(np.abs(d / D100 - 1) < 0.01), d
    # the cell is cached: a rotated view costs no new multislice run
    t0 = time.perf_counter()
    rot = simulate_image(mos2(), m, pixel_size_A=0.1, shape=(128, 128), rotation_deg=23.0)
    assert time.perf_counter() - t0 < 2.0
    q1 = fft_peaks(rot.data, 0.1, 1 / D100)
    a0 = np.sort(np.degrees(np.arctan2(q[:, 1], q[:, 0])) % 60)[0]
    a1 = np.sort(np.degrees(np.arctan2(q1[:, 1], q1[:, 0])) % 60)[0]
    assert abs(((a1 - a0) % 60) - 23.0) < 0.3


@pytest.mark.parametrize("mode", ["idpc", "haadf"])
@pytest.mark.parametrize("name", ["MoS2", "hBN"])
def test_fast_model_agrees_with_multislice(mode, name):
    atoms = mos2() if name == "MoS2" else hbn()
    m = Microscope(mode=mode, voltage_kV=80)
    kw = dict(pixel_size_A=0.1, shape=(64, 64), rotation_deg=7.0, offset_A=(0.4, 0.2))
    ms = simulate_image(atoms, m, **kw).data
    fast = simulate_image(atoms, m, method="fast", **kw).data
    assert ncc(ms, fast) >= 0.99
    # the fast model is in the same physical units (fraction of the beam), not just the same shape
    assert 0.7 < np.std(fast) / np.std(ms) < 1.4


def test_multislice_strain_changes_spacing():
    m = Microscope(mode="idpc", voltage_kV=80)
    img = simulate_image(mos2(), m, pixel_size_A=0.1, shape=(128, 128), strain=0.03)
    d = 1 / np.linalg.norm(fft_peaks(img.data, 0.1, 1 / D100), axis=1)
    assert np.all(np.abs(d / (D100 * 1.03) - 1) < 0.005), d


def test_oblique_cell_is_seamless():
    """A non-hexagonal oblique cell needs a sheared orthogonal box; the periodicity must stay exact."""
    atoms = graphene(a=2.46, vacuum=5.0)
    cell = atoms.cell[:].copy()
    cell[1, :2] = [0.9, 2.3]  # oblique, no small orthogonal supercell without shear
    atoms.set_cell(cell, scale_atoms=True)
    m = Microscope(mode="idpc", voltage_kV=80)
    c = multislice_cell_coefficients(atoms, m)
    recip = np.linalg.inv(np.asarray(atoms.cell[:2, :2])).T
    hk = c.g_invA @ np.linalg.inv(recip)  # G = h a* + k b* must have integer h, k
    strong = np.abs(c.channels["A"]) > 1e-4 * np.abs(c.channels["A"]).max()
    assert np.allclose(hk[strong], np.round(hk[strong]), atol=1e-6)
    assert math.isfinite(float(np.abs(c.channels["A"]).sum()))


def _be_square():
    """2dm-5980 (Be, 2.79 Å square net of two atoms), the benchmark structure whose iDPC exposed version 1's defaults."""
    from ase import Atoms

    a = 2.786
    return Atoms("Be2", scaled_positions=[[0.75, 0.25, 0.5], [0.25, 0.75, 0.5]], cell=[a, a, 20.0],
                 pbc=(True, True, False))


def _coefficient_table(c):
    return {tuple(np.round(g, 3)): v for g, v in zip(c.g_invA, c.descriptor())}


def test_multislice_defaults_converged_for_idpc_high_frequencies():
    """The default potential grid must carry the scattering a segment difference needs (to 4α), or every iDPC
    reflection beyond ~0.9 Å⁻¹ comes out 10–25 % weak: the benchmark's "truth" then looks blurred, and a fitted
    blur inflates the contrast the candidates are ranked by (Be lost to F₂ that way)."""
    from aiida_automat.imaging.fastsim import cell_fourier_coefficients

    atoms = _be_square()
    m = Microscope(mode="idpc", voltage_kV=80)
    ref = _coefficient_table(multislice_cell_coefficients(atoms, m, slice_thickness_A=0.5, max_angle_mrad=240.0,
                                                          probe_extent_A=24.0, use_cache=False))
    keys = [k for k in ref if 0.9 < math.hypot(*k) < 1.4]
    assert len(keys) >= 8

    def high_g_error(c):
        t = _coefficient_table(c)
        a = np.array([t[k] for k in keys])
        b = np.array([ref[k] for k in keys])
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    default = high_g_error(multislice_cell_coefficients(atoms, m, use_cache=False))
    version1 = high_g_error(multislice_cell_coefficients(atoms, m, slice_thickness_A=2.0, max_angle_mrad=60.0,
                                                         probe_extent_A=10.0, use_cache=False))
    fast = high_g_error(cell_fourier_coefficients(atoms, m))
    # measured: default 0.067, version 1 0.263, fast model 0.025 (the reference itself moves ~3 % between finer
    # grids and boxes: 0.5 Å slices with 180–300 mrad and 20–30 Å boxes)
    assert default < 0.09, default
    assert version1 > 0.2, version1  # what the test guards against
    assert fast < 0.06, fast  # the weak-phase model needs no such care: it has no grid
