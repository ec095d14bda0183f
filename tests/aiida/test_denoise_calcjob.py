"""``automat.denoise`` run for real through ``automat-exec`` on localhost, the ``denoise_image``
calcfunction, the checkpoint node and its sha256, and caching keyed on the weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

pytestmark = pytest.mark.aiida

EXECUTABLE = Path(sys.executable).with_name("automat-exec")


@pytest.fixture
def code(aiida_code_installed):
    if not EXECUTABLE.is_file():
        pytest.skip(f"{EXECUTABLE} is not installed")
    return aiida_code_installed(filepath_executable=str(EXECUTABLE), default_calc_job_plugin="automat.denoise")


@pytest.fixture(scope="module")
def noisy():
    """A 128² ADF image of MoS2 at 3000 e/Å²: Poisson noise well above the denoiser's floor."""
    from ase.build import mx2

    from aiida_automat.imaging.fastsim import fast_image
    from aiida_automat.imaging.microscope import Microscope

    microscope = Microscope(mode="adf", voltage_kV=80.0, semiangle_mrad=30.0, source_size_A=0.3)
    atoms = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19)
    return fast_image(atoms, microscope, 0.1, (128, 128), 17.0, (1.0, 0.5), dose_e_per_A2=3e3,
                      rng=np.random.default_rng(5))


@pytest.fixture
def image_node(noisy):
    from aiida_automat.data.stem_image import StemImageData

    return StemImageData(noisy)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second, valid checkpoint (gate nudged): same network, other weights, other sha256."""
    from aiida_automat.denoise.model import RESOURCE_DIR, CONFIG_NAME, load_model, save_checkpoint

    model = load_model()
    config = json.loads((RESOURCE_DIR / CONFIG_NAME).read_text())
    path = tmp_path_factory.mktemp("ckpt") / "denoiser-nudged.pt"
    gate = model.gate_W.copy()
    gate[2, 0] += 0.5  # favour the Gaussian expert a little
    sha = save_checkpoint(path, model.net, gate, config)
    path.with_suffix(".json").write_text(json.dumps({**config, "sha256": sha, "command": "test: gate nudged"}))
    return path


def _run(code, image, model=None, parameters=None):
    from aiida.engine import run_get_node
    from aiida.orm import Dict

    builder = code.get_builder()
    builder.image = image
    if model is not None:
        builder.model = model
    if parameters is not None:
        builder.parameters = Dict(parameters)
    return run_get_node(builder)


def test_default_checkpoint_node_records_sha256_and_config():
    from aiida_automat.calculations.denoise import default_denoiser
    from aiida_automat.denoise.model import CHECKPOINT_NAME, CONFIG_NAME, RESOURCE_DIR
    from aiida_automat.hashing import file_sha256

    node = default_denoiser()
    assert node.is_stored and node.name == "denoiser"
    assert node.sha256 == file_sha256(RESOURCE_DIR / CHECKPOINT_NAME)
    assert node.config["model_pixel_A"] == json.loads((RESOURCE_DIR / CONFIG_NAME).read_text())["model_pixel_A"]
    assert default_denoiser().pk == node.pk  # stored once, found again by sha256


def test_denoise_calcjob_default_model(code, image_node, noisy):
    results, node = _run(code, image_node)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    model = node.inputs.model
    assert model.name == "denoiser"
    out, report = results["image"], results["report"].get_dict()
    assert out.shape == (128, 128) and out.pixel_size_A == image_node.pixel_size_A
    assert out.metadata["denoise"]["model_sha256"] == model.sha256 == report["model_sha256"]
    assert sum(report["gate_weights"].values()) == pytest.approx(1.0, abs=1e-9)
    assert report["noise_sigma_after"] < 0.5 * report["noise_sigma_before"]
    assert report["denoise_seconds"] > 0 and report["wall_time_s"] >= report["denoise_seconds"]
    # the output image really is smoother than the input, not only the report
    from aiida_automat.denoise import noise_sigma

    assert noise_sigma(out.get_array("image")) == pytest.approx(report["noise_sigma_after"], rel=1e-5)


def test_spec_rejects_bad_parameters_and_models(code, image_node):
    from aiida_automat.data.model import ModelCheckpointData

    with pytest.raises(ValueError, match="unknown denoise parameter"):
        _run(code, image_node, parameters={"tile": 256})
    with pytest.raises(ValueError, match="setting must be one of"):
        _run(code, image_node, parameters={"setting": "max"})
    with pytest.raises(ValueError, match="keep_aperiodic"):
        _run(code, image_node, parameters={"keep_aperiodic": "yes"})
    with pytest.raises(ValueError, match="must be a denoiser checkpoint"):
        _run(code, image_node, model=ModelCheckpointData.get_or_create("chgnet"))


def test_corrupt_checkpoint_exit_440(code, image_node, tmp_path):
    from aiida_automat.data.model import ModelCheckpointData

    path = tmp_path / "broken-denoiser.pt"
    path.write_bytes(b"not a torch checkpoint" * 100)
    model = ModelCheckpointData.get_or_create(path, name="denoiser")
    _, node = _run(code, image_node, model=model)
    assert node.exit_status == 440, node.exit_message
    assert "cannot load denoiser checkpoint" in node.exit_message


def test_checkpoint_sha256_mismatch_exit_441(code, image_node, monkeypatch):
    """A copy that is not the node's file (here: the sha256 the job is told differs) is refused before
    loading. The node itself cannot hold a wrong sha256 (checked when stored), so the job's parameters
    are altered, as a corrupt transfer would."""
    import aiida_automat.calculations.denoise as module

    original = module.DenoiseCalculation.stage_parameters

    def tampered(self):
        params = original(self)
        params["model"]["sha256"] = "0" * 64
        return params

    monkeypatch.setattr(module.DenoiseCalculation, "stage_parameters", tampered)
    _, node = _run(code, image_node)
    assert node.exit_status == 441, node.exit_message
    assert "000000000000" in node.exit_message
    assert "denoised.npz" not in node.outputs.retrieved.base.repository.list_object_names()


def test_blank_image_exit_320(code):
    from aiida_automat.data.stem_image import StemImageData
    from aiida_automat.imaging.image import StemImage

    blank = StemImageData(StemImage(data=np.full((64, 64), 3.0, dtype=np.float32), pixel_size_A=0.1))
    _, node = _run(code, blank)
    assert node.exit_status == 320, node.exit_message
    assert "blank" in node.exit_message


def test_calcfunction_same_outputs_and_exit_codes(image_node):
    from aiida.orm import Dict

    from aiida_automat.calculations.denoise_function import default_denoiser, denoise_image
    from aiida_automat.data.stem_image import StemImageData
    from aiida_automat.imaging.image import StemImage

    model = default_denoiser()
    results, node = denoise_image.run_get_node(image_node, model, Dict({"setting": "light"}))
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    report = results["report"].get_dict()
    assert report["setting"] == "light" and report["gate_weights"]["bragg"] == 0.0
    assert sum(report["gate_weights"].values()) == pytest.approx(1.0, abs=1e-9)
    assert report["noise_sigma_after"] < report["noise_sigma_before"]
    assert results["image"].metadata["denoise"]["model_sha256"] == model.sha256
    assert node.inputs.model.pk == model.pk  # the weights are in the graph

    _, node = denoise_image.run_get_node(image_node, model, Dict({"strength": 2}))
    assert node.exit_status == 310 and "unknown denoise parameter" in node.exit_message
    small = StemImageData(StemImage(data=np.random.default_rng(0).random((20, 20)), pixel_size_A=0.1))
    _, node = denoise_image.run_get_node(small, model)
    assert node.exit_status == 320 and "20×20" in node.exit_message


def test_caching_follows_the_checkpoint(code, image_node, other_checkpoint):
    from aiida.manage.caching import enable_caching

    from aiida_automat.data.model import ModelCheckpointData

    other = ModelCheckpointData.get_or_create(other_checkpoint)  # family guessed from the file name
    assert other.name == "denoiser" and other.config["command"] == "test: gate nudged"
    with enable_caching(identifier="aiida.calculations:automat.denoise"):
        _, first = _run(code, image_node)
        _, again = _run(code, image_node.clone())
        results, nudged = _run(code, image_node, model=other)
    assert first.is_finished_ok and again.is_finished_ok and nudged.is_finished_ok
    assert again.base.caching.is_created_from_cache
    assert again.base.caching.get_hash() == first.base.caching.get_hash()
    assert not nudged.base.caching.is_created_from_cache
    assert nudged.base.caching.get_hash() != first.base.caching.get_hash()
    assert results["image"].metadata["denoise"]["model_sha256"] == other.sha256 != first.inputs.model.sha256
