"""The agent-driven ReconstructionWorkChain run with ``run()`` on the test profile."""

import numpy as np
import pytest
from aiida import orm
from aiida.engine import run_get_node
from ase.build import mx2

from aiida_automat.agent.state import WIDEST_K
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
    trace = results["trace"].get_list()
    assert trace[-1]["action"] == "give_up"
    # the recovery was tried: each denoise setting once, each denoised image measured once
    assert [(d["action"], d["arguments"].get("setting")) for d in trace[:-1]] == [
        ("measure_lattice", None), ("denoise", "auto"), ("measure_lattice", None),
        ("denoise", "strong"), ("measure_lattice", None)]
    assert len([n for n in node.called if n.process_label == "denoise_image" and n.is_finished_ok]) == 2


@pytest.mark.slow
def test_full_chain_relax_and_dft_check(aiida_profile, aiida_code_installed, pw_code, pseudo_family):
    """Image → structure → CHGNet relaxation → QE check, as one provenance graph."""
    import pathlib
    import sys

    from aiida_automat.workflows.reconstruction import ReconstructionWorkChain as WC

    graphene = atoms_to_structure(_graphene())
    img = fast_image(_graphene(), Microscope(mode="haadf", voltage_kV=80, semiangle_mrad=30), pixel_size_A=0.08,
                     shape=(128, 128), rotation_deg=9.0, dose_e_per_A2=5e4, rng=np.random.default_rng(2))
    code = aiida_code_installed(default_calc_job_plugin="automat.relax",
                                filepath_executable=str(pathlib.Path(sys.executable).with_name("automat-exec")))
    builder = WC.get_builder_from_protocol(
        StemImageData(img), protocol="fast", templates=[graphene], code=code,
        overrides={"parameters": {"relax": True, "dft": True}, "relax_parameters": {"fmax": 0.1, "steps": 60}},
    )
    builder.pw_code = pw_code
    builder.pseudo_family = orm.Str(pseudo_family.label)
    builder.dft_parameters = orm.Dict({"protocol": "fast", "overrides": TEST_OVERRIDES, "options": SERIAL})
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert results["structure"].get_formula() == "C2"
    assert "relaxed_structure" in results and "energies" in results
    dft = results["dft"].get_dict()
    assert abs(dft["formation_energy_per_atom_eV"]) < 0.05  # graphene vs graphite
    actions = [d["action"] for d in results["trace"].get_list()]
    assert actions[-3:] == ["relax", "dft_check", "finish"]


def _graphene(a=2.467):
    from ase import Atoms

    return Atoms("C2", scaled_positions=[(0, 0, 0.5), (1 / 3, 2 / 3, 0.5)],
                 cell=[[a, 0, 0], [-a / 2, a * 3**0.5 / 2, 0], [0, 0, 20.0]], pbc=(True, True, False))


from tests.aiida.test_dft_check import SERIAL, TEST_OVERRIDES, pseudo_family, pw_code, pw_executable  # noqa: E402,F401


def _run_scripted_llm(image, script):
    """The WorkChain steered by the real openai client against a local server replaying ``script``."""
    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI(script) as server:
        builder = ReconstructionWorkChain.get_builder_from_protocol(
            image, templates=[atoms_to_structure(MOS2)], overrides={"parameters": {"relax": False}},
            policy="llm", base_url=server.base_url, model="scripted", timeout_s=5.0,
        )
        results, node = run_get_node(builder)
    return builder, results, node


def test_llm_policy_steers_the_workchain_and_bad_replies_fall_back(aiida_profile_clean, mos2_image):
    """The real openai client over HTTP to a scripted local server: valid moves are followed, garbage and
    impossible moves are recorded and the rules decide those steps."""
    from tests.fake_openai import garbage, tool_call

    script = [
        tool_call("measure_lattice", {}),
        garbage(),  # rules decide: retrieve
        tool_call("reconstruct", {"candidate": 0}),
        tool_call("relax", {"potential": "auto"}),  # impossible: nothing verified yet -> rules: verify 0
        tool_call("finish", {"candidate": 0}),
    ]
    builder, results, node = _run_scripted_llm(mos2_image, script)
    assert node.is_finished_ok, node.exit_message
    trace = results["trace"].get_list()
    assert [d["action"] for d in trace] == ["measure_lattice", "retrieve", "reconstruct", "verify", "finish"]
    assert [d["policy"] for d in trace] == ["llm", "llm->rules", "llm", "llm->rules", "llm"]
    assert "needs a verified candidate" in trace[3]["reason"]
    decisions = [n for n in node.called if n.process_label == "decide"]
    assert all(n.outputs.result["model"] == "scripted" for n in decisions)
    assert results["structure"].get_formula(mode="hill_compact") == "MoS2"


def test_denoised_image_is_used_and_rolled_back(aiida_profile_clean, mos2_image):
    """An LLM that denoises first: later actions use the denoised image (output ``denoised_image``, its
    checkpoint's sha256 in the metadata); 'none' rolls back to the raw image, which is then the one used."""
    from tests.fake_openai import tool_call

    script = [tool_call("denoise", {"setting": "auto"}), tool_call("measure_lattice", {})]
    builder, results, node = _run_scripted_llm(mos2_image, script)
    assert node.is_finished_ok, node.exit_message
    assert results["structure"].get_formula(mode="hill_compact") == "MoS2"
    denoised = results["denoised_image"]
    assert denoised.metadata["denoise"]["model_sha256"] == builder.denoiser.sha256
    lattice_call = next(n for n in node.called if n.process_label == "measure_lattice")
    assert lattice_call.inputs.image.uuid == denoised.uuid

    script = [tool_call("denoise", {"setting": "strong"}), tool_call("denoise", {"setting": "none"})]
    builder, results, node = _run_scripted_llm(mos2_image, script)
    assert node.is_finished_ok, node.exit_message
    assert "denoised_image" not in results
    lattice_call = next(n for n in node.called if n.process_label == "measure_lattice")
    assert lattice_call.inputs.image.uuid == builder.image.uuid


def test_formula_the_image_cannot_rule_out_is_reported(aiida_profile_clean, mos2_image):
    """MoS2 with an H atom in the hollow site images like MoS2 in HAADF (Z = 1): answer MoS2 (or HMoS2), the
    other one listed as an alternative in the outputs, the report and result.json; MoSe2 is not."""
    from aiida.cmdline.utils.common import get_workchain_report

    from aiida_automat.cli.reconstruct import result_of

    hydride = MOS2.copy()
    hydride.append("H")
    hydride.positions[-1] = hydride.cell.cartesian_positions([1 / 3, 2 / 3, 0.5])  # the empty hollow column
    templates = [atoms_to_structure(MOS2), atoms_to_structure(hydride),
                 atoms_to_structure(mx2(formula="MoSe2", kind="2H", a=3.3, thickness=3.3, vacuum=10))]
    builder = ReconstructionWorkChain.get_builder_from_protocol(
        mos2_image, protocol="fast", templates=templates, overrides={"parameters": {"relax": False, "k": 3}})
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    answer = results["structure"].get_formula(mode="hill_compact")
    assert answer in ("MoS2", "HMoS2")
    scores = [(n.inputs.structure.get_formula(mode="hill_compact"), n.outputs.result["score"]) for n in node.called
              if n.process_label == "verify_candidate"]
    alts = dict(results.get("alternatives", {}))
    assert alts, scores
    assert len(alts) == 1  # the other of the two; MoSe2 is clearly worse
    other = next(iter(alts.values())).get_formula(mode="hill_compact")
    assert {answer, other} == {"MoS2", "HMoS2"}
    assert "does not rule them out" in get_workchain_report(node, "REPORT")
    listed = result_of(node)["alternatives"]
    from aiida_automat.data.structures import structure_to_atoms
    from aiida_automat.imaging.structures import reduced_formula

    assert [a["formula"] for a in listed] == [reduced_formula(structure_to_atoms(next(iter(alts.values()))))]
    assert listed[0]["verification_score"] > 0.9 and listed[0]["template_id"]
    from aiida_automat.bench.daemon_runner import result_of_workchain

    row = result_of_workchain(node)  # `bench run --daemon` reports them as the in-process loop does
    assert list(row.alternatives) == [listed[0]["template_id"]]
    assert reduced_formula(next(iter(row.alternatives.values()))) == listed[0]["formula"]
    from aiida_automat.cli.reconstruct import print_summary

    lines = []
    print_summary(result_of(node), echo=lines.append)
    assert any(line.startswith("not excluded") and listed[0]["formula"] in line for line in lines)


def test_mediocre_best_widens_the_retrieval(aiida_profile_clean, mos2_image):
    """With ``widen_below`` above what the best candidate reaches, the WorkChain retrieves 2k templates from its
    library node, then ``WIDEST_K``, verifies every new one, and still answers MoS2; the report says why."""
    from aiida.cmdline.utils.common import get_workchain_report

    from aiida_automat.data.library import TemplateLibraryData
    from aiida_automat.library.build import build_library
    from aiida_automat.library.structures import load_structure_set

    # MoS2-c63547f0 is 2H (the image), MoS2-44a10f28 is 1T
    ids = ["MoS2-c63547f0", "MoS2-44a10f28", "WS2-231d4b60", "MoSe2-a6703220", "BN-0e329ca7"]
    lib = build_library(load_structure_set(ids=ids), name="widen-tiny", modes=("haadf",))
    node_lib = TemplateLibraryData.from_library(lib).store()
    builder = ReconstructionWorkChain.get_builder_from_protocol(
        mos2_image, protocol="fast", library=node_lib,
        overrides={"parameters": {"relax": False, "k": 1, "widen_below": 0.99999}})
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert results["structure"].get_formula(mode="hill_compact") == "MoS2"
    assert results["template"].base.extras.get("template_id") == "MoS2-c63547f0"
    trace = [(d["action"], d.get("arguments", {})) for d in results["trace"].get_list()]
    retrieves = [args.get("k") for action, args in trace if action == "retrieve"]
    assert retrieves == [1, 2, WIDEST_K], trace
    # every candidate of the widest list (all the library's compatible templates here) is verified, once
    verified = [n for n in node.called if n.process_label == "verify_candidate"]
    assert [a for a, _ in trace].count("verify") == len(verified) == len(results["retrieval"]["candidates"]) > 2
    report = get_workchain_report(node, "REPORT")
    assert "widen the search to k=2" in report and f"widen the search to k={WIDEST_K}" in report


def test_absolute_contrast_penalises_a_heavier_look_alike(aiida_profile_clean):
    """On an ADF image in beam fractions, WS2 (same pattern, W ≫ Mo) pays for its brightness: the report says so,
    its verification node records the contrast and penalty, and MoS2 is the answer with WS2 not an alternative."""
    from aiida.cmdline.utils.common import get_workchain_report

    img = fast_image(MOS2, Microscope(mode="adf"), pixel_size_A=0.1, shape=(160, 160), rotation_deg=31.0,
                     dose_e_per_A2=3e4, rng=np.random.default_rng(11))
    templates = [atoms_to_structure(mx2(formula="WS2", kind="2H", a=3.18, thickness=3.14, vacuum=10)),
                 atoms_to_structure(MOS2)]
    builder = ReconstructionWorkChain.get_builder_from_protocol(
        StemImageData(img), protocol="fast", templates=templates, overrides={"parameters": {"relax": False, "k": 2}})
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert results["structure"].get_formula(mode="hill_compact") == "MoS2"
    assert "alternatives" not in results
    verified = {n.inputs.structure.get_formula(mode="hill_compact"): n.outputs.result.get_dict() for n in node.called
                if n.process_label == "verify_candidate"}
    assert verified["S2W"]["contrast"] < 0.8 and verified["S2W"]["contrast_penalty"] > 0.01
    assert verified["MoS2"]["contrast_penalty"] < 0.001
    report = get_workchain_report(node, "REPORT")
    assert "candidate 0 (S2W): the image has 0.4" in report and "× the contrast this structure would give it" in report
