"""The denoiser's training recipe: reproducible bytes, a loadable checkpoint, and a real held-out split."""

from __future__ import annotations

import json

import numpy as np

from aiida_automat.denoise import denoise, load_model
from aiida_automat.denoise.data import _pool, held_out_structures, training_structures
from aiida_automat.denoise.train import train


def test_held_out_tenth_is_never_in_training():
    pool, train_set, held = _pool(), training_structures(), held_out_structures()
    assert len(train_set) + len(held) == len(pool)
    assert 0.08 < len(held) / len(pool) < 0.12
    ids = {id(a) for a in train_set}
    assert not any(id(a) in ids for a in held)
    assert train_set[0].get_chemical_formula() == "MoS2"


def test_small_training_run_is_byte_reproducible(tmp_path):
    kw = dict(n_images=6, steps=8, seed=3, n_gate_images=3, channels=8, depth=3, log=lambda m: None)
    a = train(tmp_path / "a", **kw)
    b = train(tmp_path / "b", **kw)
    assert a.read_bytes() == b.read_bytes()
    cfg = json.loads((tmp_path / "a" / "denoiser.json").read_text())
    assert cfg["steps"] == 8 and "held_out" in cfg and cfg["sha256"]
    model = load_model(a)
    assert model.sha256 == cfg["sha256"]
    from ase.build import mx2

    from aiida_automat.imaging.fastsim import fast_image
    from aiida_automat.imaging.microscope import Microscope

    img = fast_image(mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19), Microscope(mode="adf"), 0.1, (64, 64),
                     5.0, dose_e_per_A2=1e4, rng=np.random.default_rng(0))
    out = denoise(img, model=model)
    assert out.image.data.shape == (64, 64) and np.isfinite(out.image.data).all()
    assert abs(sum(out.gate_weights.values()) - 1.0) < 1e-9
