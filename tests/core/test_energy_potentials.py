"""Potential factory: real MatterSim loading code on a checkpoint made here, real CHGNet weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import mx2

from aiida_automat.energy import potentials
from aiida_automat.energy.potentials import check_elements, load_potential, sha256_file, single_point
from aiida_automat.errors import PotentialError, UnknownElement

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def tiny_mattersim_checkpoint(path, *, nan: bool = False):
    """A small random M3GNet saved in the format ``Potential.from_checkpoint`` reads."""
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet

    torch.manual_seed(0)
    model = M3Gnet(num_blocks=1, units=16, max_l=2, max_n=2, cutoff=4.0, threebody_cutoff=3.0, device="cpu")
    state = model.state_dict()
    if nan:
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model_name": "m3gnet", "model": state, "model_args": model.model_args}, path)
    return path


@pytest.fixture
def mos2():
    return mx2("MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=8.0)


def test_mattersim_checkpoint_loads_and_computes(tmp_path, mos2):
    pytest.importorskip("mattersim")
    path = tiny_mattersim_checkpoint(tmp_path / "tiny-m3gnet.pth")
    calc, info = load_potential("mattersim", path, device="cpu")
    assert info.name == "mattersim"
    assert info.version == "tiny-m3gnet"
    assert info.sha256 == sha256_file(path)
    assert info.max_z == 94
    result = single_point(mos2, calc)
    assert math.isfinite(result.energy)
    assert result.forces.shape == (3, 3)
    assert result.stress.shape == (6,)
    assert result.energy_per_atom == pytest.approx(result.energy / 3)


def test_mattersim_nan_weights_raise_potential_error(tmp_path, mos2):
    pytest.importorskip("mattersim")
    calc, _ = load_potential("mattersim", tiny_mattersim_checkpoint(tmp_path / "nan.pth", nan=True))
    with pytest.raises(PotentialError, match="non-finite"):
        single_point(mos2, calc)


def test_mattersim_bad_file_and_missing_cache(tmp_path, monkeypatch):
    pytest.importorskip("mattersim")
    bad = tmp_path / "bad.pth"
    torch.save({"model_name": "something-else", "model": {}, "model_args": {}}, bad)
    with pytest.raises(PotentialError, match="not a loadable MatterSim checkpoint"):
        load_potential("mattersim", bad)
    monkeypatch.setattr(potentials, "MATTERSIM_CACHE", tmp_path / "empty-cache")
    with pytest.raises(PotentialError, match="not in"):
        load_potential("mattersim", "mattersim-v1.0.0-5M")
    assert potentials.default_potential() == "chgnet"
    # a cached checkpoint makes MatterSim the default
    (tmp_path / "empty-cache").mkdir()
    tiny_mattersim_checkpoint(tmp_path / "empty-cache" / "mattersim-v1.0.0-1M.pth")
    assert potentials.default_potential() == "mattersim"
    _, info = load_potential("auto")
    assert (info.name, info.version) == ("mattersim", "mattersim-v1.0.0-1M")


def test_chgnet_from_wheel(mos2):
    calc, info = load_potential("chgnet")
    assert (info.name, info.version) == ("chgnet", "0.3.0")
    assert info.sha256 == sha256_file(info.checkpoint_path)
    result = single_point(mos2, calc)
    # CHGNet MoS2 monolayer: about -7.3 eV/atom on the MP2020 scale
    assert -7.8 < result.energy_per_atom < -6.8
    assert "chgnet 0.3.0" in info.label


def test_unknown_potential_and_version():
    with pytest.raises(PotentialError, match="unknown potential"):
        load_potential("lennard-jones")
    with pytest.raises(PotentialError, match="unknown CHGNet version"):
        load_potential("chgnet", "9.9.9")


def test_sevennet_missing_is_actionable():
    try:
        import sevenn  # noqa: F401
    except ImportError:
        with pytest.raises(PotentialError, match="pip install sevenn"):
            load_potential("sevennet")
    else:
        pytest.skip("sevenn is installed")


def test_cuda_request_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PotentialError, match="CUDA is not available"):
        load_potential("chgnet", device="cuda")


def test_unsupported_element_is_unknown_element():
    from ase import Atoms

    info = potentials.PotentialInfo("chgnet", "0.3.0", None, None)
    check_elements(Atoms("MoS2", positions=np.zeros((3, 3))), info)
    with pytest.raises(UnknownElement, match="Am"):
        check_elements(Atoms("AmS2", positions=np.zeros((3, 3))), info)
