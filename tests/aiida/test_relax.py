"""``automat.relax`` CalcJob end to end through ``automat-exec`` on localhost, model checkpoint nodes and
the elemental-reference cache. Real CHGNet and real MatterSim loading code (tiny checkpoint made here)."""

from __future__ import annotations

import pathlib
import shutil
import sys

import numpy as np
import pytest
from ase.build import mx2

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from tests.core.test_energy_potentials import tiny_mattersim_checkpoint  # noqa: E402

EXECUTABLE = pathlib.Path(sys.executable).parent / "automat-exec"


@pytest.fixture
def code(aiida_code_installed):
    if not EXECUTABLE.is_file():
        pytest.skip(f"{EXECUTABLE} is not installed")
    return aiida_code_installed(filepath_executable=str(EXECUTABLE), default_calc_job_plugin="automat.relax")


def structure_node(atoms=None):
    from aiida import orm

    atoms = atoms if atoms is not None else mx2("MoS2", kind="2H", a=3.28, thickness=3.2, vacuum=7.0)
    node = orm.StructureData(ase=atoms)
    node.pbc = (True, True, False)
    return node


def test_model_checkpoint_deduplicated_by_sha256(tmp_path):
    from aiida_automat.data.model import ModelCheckpointData
    from aiida_automat.energy.potentials import chgnet_checkpoint, sha256_file

    node = ModelCheckpointData.get_or_create("chgnet")
    assert node.is_stored
    assert (node.name, node.version) == ("chgnet", "0.3.0")
    assert node.sha256 == sha256_file(chgnet_checkpoint("0.3.0"))
    assert ModelCheckpointData.get_or_create("chgnet-0.3.0").pk == node.pk
    copy = tmp_path / "renamed-weights.bin"
    shutil.copy(chgnet_checkpoint("0.3.0"), copy)
    assert ModelCheckpointData.get_or_create(copy, name="chgnet").pk == node.pk
    with pytest.raises(ValueError, match="family"):
        ModelCheckpointData.get_or_create(copy)

    ms = ModelCheckpointData.get_or_create(tiny_mattersim_checkpoint(tmp_path / "mattersim-tiny.pth"))
    assert (ms.name, ms.version) == ("mattersim", "mattersim-tiny")
    assert ms.pk != node.pk


def test_relax_chgnet_mos2_with_references(code):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_automat.calculations.references import cached_references, get_elemental_references
    from aiida_automat.calculations.relax import RelaxCalculation

    builder = RelaxCalculation.get_builder_from_protocol(code, structure_node(), model="chgnet", protocol="fast")
    model = builder.model
    assert set(builder.references) == {"Mo", "S"}
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)

    params = results["output_parameters"].get_dict()
    assert params["converged"] is True
    assert params["model"]["sha256"] == model.sha256 and params["model"]["name"] == "chgnet"
    assert params["settings"]["fmax"] == 0.1
    relaxed = results["relaxed_structure"]
    assert relaxed.pbc == (True, True, False)
    a = np.linalg.norm(relaxed.cell[0])
    assert abs(a - 3.18) / 3.18 < 0.02
    np.testing.assert_allclose(relaxed.cell[2], structure_node().cell[2], atol=1e-6)
    assert -1.4 < params["formation_energy_per_atom"] < -0.7
    assert results["forces"].get_array("forces").shape == (3, 3)
    trajectory = results["trajectory"]
    assert trajectory.numsteps == params["steps"] + 1
    assert trajectory.get_array("energy")[-1] == pytest.approx(params["energy"], abs=1e-5)
    # the model and the cached references are input nodes of the calculation
    assert node.inputs.model.pk == model.pk
    assert {k: v.pk for k, v in node.inputs.references.items()} == {k: v.pk for k, v in builder.references.items()}

    # computed once per model: a second request reuses the nodes, the cache holds them in its Group
    again = get_elemental_references(model, ["S", "Mo"])
    assert {k: v.pk for k, v in again.items()} == {k: v.pk for k, v in builder.references.items()}
    assert set(cached_references(model)) == {"Mo", "S"}
    creator = again["Mo"].creator
    assert creator.process_label == "compute_elemental_references"
    assert creator.inputs.model.pk == model.pk
    assert isinstance(again["Mo"], orm.Dict) and again["Mo"]["structure"] == "bcc"


def test_relax_not_converged_attaches_outputs(code):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_automat.data.model import ModelCheckpointData

    builder = code.get_builder()
    builder.structure = structure_node()
    builder.model = ModelCheckpointData.get_or_create("chgnet")
    builder.parameters = orm.Dict({"protocol": "fast", "steps": 2, "fmax": 0.001})
    results, node = run_get_node(builder)
    assert node.exit_status == 411, node.exit_message
    assert "after 2 steps" in node.exit_message
    assert results["output_parameters"]["converged"] is False
    assert "relaxed_structure" in results


def test_relax_unsupported_element(code):
    from aiida.engine import run_get_node

    from aiida_automat.data.model import ModelCheckpointData

    atoms = mx2("MoS2", kind="2H", a=3.2, vacuum=7.0)
    atoms[0].symbol = "Am"
    builder = code.get_builder()
    builder.structure = structure_node(atoms)
    builder.model = ModelCheckpointData.get_or_create("chgnet")
    _, node = run_get_node(builder)
    assert node.exit_status == 322, node.exit_message
    assert "Am" in node.exit_message


def test_relax_mattersim_checkpoint_copied_to_remote(code, tmp_path):
    """MatterSim's real loading code runs inside automat-exec on the copied node file; NaN weights → 410."""
    pytest.importorskip("mattersim")
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_automat.data.model import ModelCheckpointData

    model = ModelCheckpointData.get_or_create(tiny_mattersim_checkpoint(tmp_path / "mattersim-tiny.pth"))
    builder = code.get_builder()
    builder.structure = structure_node()
    builder.model = model
    builder.parameters = orm.Dict({"protocol": "fast", "steps": 3})
    results, node = run_get_node(builder)
    assert node.exit_status in (0, 411), node.exit_message
    params = results["output_parameters"].get_dict()
    assert params["model"] == {
        "name": "mattersim", "version": "mattersim-tiny", "sha256": model.sha256, "device": "cpu", "max_z": 94
    }
    assert np.isfinite(params["energy"])

    broken = ModelCheckpointData.get_or_create(tiny_mattersim_checkpoint(tmp_path / "mattersim-nan.pth", nan=True))
    builder.model = broken
    _, node = run_get_node(builder)
    assert node.exit_status == 410, node.exit_message
    assert "non-finite" in node.exit_message


def test_invalid_inputs_rejected(code):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_automat.data.model import ModelCheckpointData

    builder = code.get_builder()
    builder.structure = structure_node()
    builder.model = ModelCheckpointData.get_or_create("chgnet")
    with pytest.raises(ValueError, match="optimizer"):
        builder.parameters = orm.Dict({"protocol": "fast", "optimizer": "MDMin"})
    with pytest.raises(ValueError, match="device"):
        builder.metadata.options.device = "tpu"
    builder.parameters = orm.Dict({"protocol": "fast"})
    builder.references = {"Mo": orm.Dict({"energy_per_atom": -10.0, "model_sha256": "0" * 64})}
    with pytest.raises(ValueError, match="missing for S"):
        run_get_node(builder)
    builder.references = {
        s: orm.Dict({"energy_per_atom": -5.0, "model_sha256": "0" * 64}) for s in ("Mo", "S")
    }
    with pytest.raises(ValueError, match="not the input model"):
        run_get_node(builder)
