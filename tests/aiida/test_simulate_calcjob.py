"""``SimulateCalculation`` run for real through ``automat-exec`` on the localhost computer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.aiida

MOS2_A = 3.19
D100 = MOS2_A * np.sqrt(3) / 2  # {100} plane spacing of a hexagonal lattice


@pytest.fixture
def code(aiida_code_installed):
    return aiida_code_installed(
        filepath_executable=str(Path(sys.executable).with_name("automat-exec")),
        default_calc_job_plugin="automat.simulate",
    )


@pytest.fixture
def mos2():
    from aiida.orm import StructureData
    from ase.build import mx2

    atoms = mx2("MoS2", a=MOS2_A, vacuum=5.0)
    return StructureData(ase=atoms)


def strongest_spacing_A(image: np.ndarray, pixel_size_A: float, pad: int = 512) -> float:
    """Real-space period of the strongest Fourier peak beyond 1/6 Å⁻¹ (skips slow background)."""
    window = np.outer(np.hanning(image.shape[0]), np.hanning(image.shape[1]))
    power = np.abs(np.fft.fft2((image - image.mean()) * window, s=(pad, pad))) ** 2
    k = np.fft.fftfreq(pad, d=pixel_size_A)
    kk = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    power[kk < 1 / 6] = 0
    return 1.0 / kk.flat[np.argmax(power)]


def _run(code, structure, parameters):
    from aiida.engine import run_get_node
    from aiida.orm import Dict

    builder = code.get_builder()
    builder.structure = structure
    builder.parameters = Dict(parameters)
    return run_get_node(builder)


def test_simulate_mos2_fast(code, mos2):
    from aiida_automat.data.stem_image import StemImageData

    parameters = {"method": "fast", "shape": [64, 64], "pixel_size_A": 0.2, "voltage_kV": 60.0, "mode": "haadf",
                  "rotation_deg": 10.0}
    results, node = _run(code, mos2, parameters)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    image = results["image"]
    assert isinstance(image, StemImageData)
    assert image.shape == (64, 64) and image.pixel_size_A == (0.2, 0.2)
    assert (image.mode, image.voltage_kV) == ("haadf", 60.0)
    assert image.metadata["simulation"]["method"] == "fast"
    spacing = strongest_spacing_A(image.get_array("image"), 0.2)
    assert spacing == pytest.approx(D100, rel=0.03)
    core = image.to_stem_image()
    assert core.shape == (64, 64) and np.all(np.isfinite(core.data))


def test_spec_rejects_bad_parameters(code, mos2):
    with pytest.raises(ValueError, match="method must be one of"):
        _run(code, mos2, {"method": "magic"})
    with pytest.raises(ValueError, match="unknown simulate parameter"):
        _run(code, mos2, {"pixel_size": 0.1})


def test_executable_rejects_bad_parameters_with_exit_310(code, mos2, monkeypatch):
    """If the spec check is bypassed (old plugin, edited inputs), the job itself says 310, not a crash."""
    import aiida_automat.calculations.simulate as module

    monkeypatch.setattr(module, "check_parameters", lambda parameters: dict(parameters))
    _, node = _run(code, mos2, {"method": "fast", "shape": [64, 64], "voltage_kV": 5000.0})
    assert node.exit_status == 310
    assert "voltage" in node.exit_message


@pytest.mark.slow
def test_simulate_mos2_multislice_with_noise(code, mos2):
    parameters = {"method": "multislice", "shape": [64, 64], "pixel_size_A": 0.2, "voltage_kV": 60.0,
                  "dose_e_per_A2": 5e3, "seed": 3}
    results, node = _run(code, mos2, parameters)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    image = results["image"]
    assert image.dose_e_per_A2 == pytest.approx(5e3)
    assert strongest_spacing_A(image.get_array("image"), 0.2) == pytest.approx(D100, rel=0.03)


def test_check_parameters_normalises_and_is_idempotent():
    from aiida_automat.cli.stage_simulate import check_parameters

    params = check_parameters({"method": "fast", "shape": 64, "pixel_size_A": [0.2, 0.2], "strain": 0.01,
                               "mode": "ABF", "distortion": {"scale_x": 1.02}})
    assert params["shape"] == [64, 64] and params["pixel_size_A"] == 0.2
    assert params["microscope"]["mode"] == "abf" and params["seed"] == 0
    assert check_parameters(params) == params


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"shape": [8, 8]}, "at least"),
        ({"pixel_size_A": -1}, "pixel_size_A"),
        ({"strain": [1, 2, 3]}, "strain"),
        ({"seed": -1}, "seed"),
        ({"dose_e_per_A2": 0}, "dose"),
        ({"distortion": {"scale_x": 9}}, "scan scale"),
        ({"semiangle_mrad": 0.1}, "semiangle"),
    ],
)
def test_check_parameters_rejects(bad, message):
    from aiida_automat.cli.stage_simulate import check_parameters
    from aiida_automat.errors import AutomatError

    with pytest.raises(AutomatError, match=message):
        check_parameters(bad)


def test_executable_writes_status_for_invalid_input(tmp_path, monkeypatch):
    """Without AiiDA: ``automat-exec simulate`` turns a bad parameter into status.json, exit 1."""
    import json

    from aiida_automat.cli.executable import main
    from aiida_automat.exit_codes import label_for_exception, status_for_label

    monkeypatch.chdir(tmp_path)
    (tmp_path / "parameters.json").write_text(json.dumps({"method": "fast", "mode": "tem"}))
    assert main(["simulate"]) == 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["ok"] is False and "mode" in status["message"]
    assert status_for_label(label_for_exception(status["error_class"])) == 310
