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
