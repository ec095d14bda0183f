"""The agent-driven ReconstructionWorkChain run with ``run()`` on the test profile."""

import numpy as np
import pytest
from aiida import orm
from aiida.engine import run_get_node
from ase.build import mx2

from aiida_automat.data.stem_image import StemImageData
from aiida_automat.data.structures import atoms_to_structure
from aiida_automat.imaging import Microscope
from aiida_automat.imaging.fastsim import fast_image
from aiida_automat.workflows.reconstruction import ReconstructionWorkChain

pytestmark = pytest.mark.aiida

MOS2 = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10)


@pytest.fixture
def mos2_image():
    img = fast_image(MOS2, Microscope(mode="haadf"), pixel_size_A=0.1, shape=(160, 160), rotation_deg=23.0,
                     strain=0.01, dose_e_per_A2=3e4, rng=np.random.default_rng(7))
    return StemImageData(img)


def test_workchain_picks_the_right_template(aiida_profile_clean, mos2_image):
    templates = [
        atoms_to_structure(mx2(formula="MoS2", kind="1T", a=3.18, thickness=3.19, vacuum=10)),
        atoms_to_structure(mx2(formula="MoSe2", kind="2H", a=3.3, thickness=3.3, vacuum=10)),
        atoms_to_structure(MOS2),
    ]
    builder = ReconstructionWorkChain.get_builder_from_protocol(
        mos2_image, protocol="fast", templates=templates, overrides={"parameters": {"relax": False, "k": 3}})
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert results["structure"].get_formula(mode="hill_compact") == "MoS2"
    assert results["template"].uuid == templates[2].uuid
    assert results["structure"].pbc == (True, True, False)
    diag = results["diagnostics"].get_dict()
    assert diag["spacegroup_number"] == 187
    assert abs(diag["lattice"]["a"] - 3.18 * 1.01) < 0.01
    trace = results["trace"].get_list()
    actions = [d["action"] for d in trace]
    assert actions[0] == "measure_lattice" and actions[-1] == "finish"
    assert actions.count("verify") == 3  # all three candidates examined, best wins
    # every decision is a calcfunction output, never a cache source
    decisions = [n for n in node.called if n.process_label == "decide"]
    assert len(decisions) == len(trace)
    assert all(not n.base.caching.is_valid_cache for n in decisions)
    assert results["overlay"].filename == "overlay.png"
    assert "data_" in results["cif"].get_content()


def test_blank_image_gives_exit_code(aiida_profile_clean):
    from aiida_automat.imaging.image import StemImage

    blank = StemImageData(StemImage(np.zeros((64, 64)) + 1.0, pixel_size_A=0.1))
    builder = ReconstructionWorkChain.get_builder_from_protocol(blank, templates=[atoms_to_structure(MOS2)],
                                                                overrides={"parameters": {"relax": False}})
    _, node = run_get_node(builder)
    assert node.exit_status == 320


def test_noise_image_gives_no_lattice(aiida_profile_clean):
    from aiida_automat.imaging.image import StemImage

    noise = StemImageData(StemImage(np.random.default_rng(1).normal(size=(128, 128)), pixel_size_A=0.1))
    builder = ReconstructionWorkChain.get_builder_from_protocol(noise, templates=[atoms_to_structure(MOS2)],
                                                                overrides={"parameters": {"relax": False}})
    results, node = run_get_node(builder)
    assert node.exit_status == 400
    assert results["trace"].get_list()[-1]["action"] == "give_up"
