"""Small template library shared by the library/retrieval tests (built once per test module)."""

from __future__ import annotations

import numpy as np

#: the usual suspects plus look-alikes (same prototype / similar lattice constants)
TEST_IDS = [
    "MoS2-44a10f28", "WS2-231d4b60", "MoSe2-a6703220", "WSe2-3d52bc42", "BN-0e329ca7", "C2-fdcf3c57",
    "NbSe2-53c8feaa", "NbS2-7f4de45e", "TaS2-0c60e3e0", "2dm-4209", "2dm-1", "2dm-3993", "2dm-4991",
    "2dm-6416", "2dm-938", "2dm-4", "PtS2-01626330", "P2-f337487c", "2dm-3274", "2dm-6367",
]


def small_templates():
    from aiida_automat.library.structures import load_structure_set

    return load_structure_set(ids=TEST_IDS)


def small_library(modes=("adf", "idpc"), **kw):
    from aiida_automat.library.build import build_library

    return build_library(small_templates(), name="test", modes=modes, **kw)


def fast(lib, tid, mode="adf", rng=None, rotation=37.0, strain=0.015, px_err=0.07, dose=3e4):
    from aiida_automat.imaging.simulate import simulate_image

    rng = rng or np.random.default_rng(7)
    img = simulate_image(lib.atoms(tid), lib.microscopes[mode], pixel_size_A=0.1, shape=(192, 192),
                         rotation_deg=rotation, offset_A=(1.3, 0.4), strain=strain, method="fast",
                         dose_e_per_A2=dose, rng=rng)
    return img.replace(pixel_size_A=0.1 * (1 + px_err))
