"""AiiDA caching for aiida-automat: re-running the same image reuses the finished work.

With caching enabled for the package's CalcJobs and calcfunctions, a second ReconstructionWorkChain on
the same image node reuses the relaxation CalcJob and the reconstruction calcfunctions (checked through
the cache-source links on the new nodes), never the agent's decisions; bumping a CalcJob's CACHE_VERSION
makes it run again.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
from ase.build import mx2

pytest.importorskip("torch")

EXECUTABLE = pathlib.Path(sys.executable).parent / "automat-exec"
CACHED = ("aiida.calculations:automat.*", "aiida_automat.calculations.*")


@pytest.fixture
def code(aiida_code_installed):
    if not EXECUTABLE.is_file():
        pytest.skip(f"{EXECUTABLE} is not installed")
    return aiida_code_installed(filepath_executable=str(EXECUTABLE), default_calc_job_plugin="automat.relax")


def _run(image, template, code):
    from aiida.engine import run_get_node

    from aiida_automat.workflows.reconstruction import ReconstructionWorkChain

    builder = ReconstructionWorkChain.get_builder_from_protocol(
        image, protocol="fast", templates=[template], code=code,
        overrides={"relax_parameters": {"fmax": 0.2, "steps": 20, "options": {"max_wallclock_seconds": 600}}})
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return node


def _children(node, label):
    return [n for n in node.called_descendants if n.process_label == label]


def test_rerun_reuses_calcjobs_and_calcfunctions_but_not_decisions(aiida_profile_clean, code, monkeypatch):
    from aiida.manage.caching import enable_caching

    from aiida_automat.calculations.relax import RelaxCalculation
    from aiida_automat.data.stem_image import StemImageData
    from aiida_automat.data.structures import atoms_to_structure
    from aiida_automat.imaging import Microscope
    from aiida_automat.imaging.fastsim import fast_image

    mos2 = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10)
    image = StemImageData(fast_image(mos2, Microscope(mode="haadf"), 0.1, (128, 128), 11.0, dose_e_per_A2=3e4,
                                     rng=np.random.default_rng(3))).store()
    template = atoms_to_structure(mos2).store()

    with enable_caching(identifier=CACHED[0]), enable_caching(identifier=CACHED[1]):
        first = _run(image, template, code)
        second = _run(image, template, code)
    relax1, relax2 = _children(first, "RelaxCalculation")[0], _children(second, "RelaxCalculation")[0]
    assert relax1.get_option("max_wallclock_seconds") == 600  # scheduler options reach the CalcJob
    assert relax2.base.caching.get_cache_source() == relax1.uuid
    assert relax2.outputs.output_parameters["energy"] == relax1.outputs.output_parameters["energy"]
    for label in ("measure_lattice", "reconstruct_candidate", "verify_candidate"):
        (n1,), (n2,) = _children(first, label), _children(second, label)
        assert n2.base.caching.get_cache_source() == n1.uuid, label
    assert all(n.base.caching.get_cache_source() is None for n in _children(second, "decide"))
    assert second.outputs.structure.get_ase().get_positions().tolist() == first.outputs.structure.get_ase().get_positions().tolist()

    # a changed CACHE_VERSION is a changed hash: the relaxation runs again instead of being reused
    monkeypatch.setattr(RelaxCalculation, "CACHE_VERSION", RelaxCalculation.CACHE_VERSION + 1)
    with enable_caching(identifier=CACHED[0]):
        third = _run(image, template, code)
    relax3 = _children(third, "RelaxCalculation")[0]
    assert relax3.base.caching.get_cache_source() is None
    assert relax3.base.caching.get_hash() != relax1.base.caching.get_hash()
    assert relax3.base.attributes.get("cache_version")["calc_job"] == RelaxCalculation.CACHE_VERSION
