"""``aiida-automat reconstruct`` on the bad-input corpus: exit status 1, one ``Error:`` line, no traceback,
and a database that is consistent afterwards.

The command runs in-process (click's CliRunner on the session's test profile, which is what the embedded
profile looks like to the command), so each refused file costs a fraction of a second; AiiDA's console log
handler is pointed at a buffer during the run, so a traceback printed by the engine is caught too.
Refused inputs must store nothing; runs that start and fail must leave one terminated, sealed process with
the specific exit status. End-to-end runs use the 128×128 px crops of the corpus and one template.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest
from aiida import orm
from ase.build import mx2
from click.testing import CliRunner

from aiida_automat.cli.main import cli

pytestmark = pytest.mark.aiida

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"


@pytest.fixture(scope="module")
def setup_done(aiida_profile):
    """The computer and codes ``reconstruct`` sets up on first use, made once so node counts are stable."""
    from aiida_automat.profile import ensure_setup

    ensure_setup()
    return aiida_profile


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "mos2.cif"
    mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10).write(path)
    return path


def n_nodes() -> int:
    return orm.QueryBuilder().append(orm.Node).count()


@contextlib.contextmanager
def console_log():
    """What AiiDA's console handler prints during the block (its stream is the real stderr otherwise)."""
    buffer = io.StringIO()
    handlers = [h for h in logging.getLogger("aiida").handlers if type(h) is logging.StreamHandler]
    old = [h.setStream(buffer) for h in handlers]
    try:
        yield buffer
    finally:
        for handler, stream in zip(handlers, old):
            handler.setStream(stream)


def reconstruct(args, env=None):
    """Run the command; returns the click result and the engine's console log."""
    import tempfile

    out = tempfile.mkdtemp(prefix="automat-bad-input-")  # a run that succeeds must not write into the checkout
    with console_log() as log:
        result = CliRunner().invoke(cli, ["reconstruct", *map(str, args), "--output-dir", out], env=env or {})
    return result, log.getvalue()


def assert_one_line_error(result, log: str, *patterns: str) -> str:
    """Exit 1 through ``user_errors`` (not an escaped exception), the last line is the error, no traceback."""
    output = result.output
    assert result.exit_code == 1, output + log
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output + log, output + log
    last = output.strip().splitlines()[-1]
    assert last.startswith("Error: "), output
    for pattern in patterns:
        assert pattern in last, last
    return last


def assert_storage_consistent():
    from aiida_automat.storage_check import storage_problems

    assert storage_problems() == []


# ------------------------------------------------------------------------------------------ refused early


READ_FAILURES = {
    "truncated.dm3": "it is truncated, corrupt or another format",
    "empty.dm3": "is empty (0 bytes)",
    "png_named.dm3": "as Gatan DigitalMicrograph",
    "text_named.tif": "as TIFF",
    "all_zero.npy": "image is blank",
    "nan_pixels.npy": "NaN/inf pixel(s)",
    "tiny_8x8.npy": "at least 32 px per side",
    "huge_header_16k.npy": "exceeds the pixel limit",
    "huge_header_16k.png": "exceeds the pixel limit",
    "mos2_no_calibration.npy": "no pixel size calibration",
}


@pytest.mark.parametrize("name", sorted(READ_FAILURES))
def test_unreadable_file_is_refused_and_stores_nothing(setup_done, template, name):
    before = n_nodes()
    result, output = reconstruct([BAD / name, "--template", template, "--no-relax"])
    assert_one_line_error(result, output, READ_FAILURES[name])
    assert n_nodes() == before


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--elements", "Mo,Xx"], {}, "'Xx' is not a chemical element"),
        (["--library", "no-such-library"], {}, "no template library named 'no-such-library'"),
        (["--template", "MISSING_CIF"], {}, "cannot read a structure from"),
        (["--template", "TEMPLATE", "--dft"], {"PATH": "/nonexistent"}, "no pw code is configured"),
    ],
    ids=["unknown-element", "unknown-library", "template-not-a-structure", "dft-without-pw.x"],
)
def test_bad_argument_is_refused_and_stores_nothing(setup_done, template, tmp_path, extra, env, message):
    (tmp_path / "notes.cif").write_text("this is not a CIF file\n")
    extra = [{"MISSING_CIF": tmp_path / "notes.cif", "TEMPLATE": template}.get(a, a) for a in extra]
    before = n_nodes()
    result, output = reconstruct([BAD / "mos2_pixel_x2.npy", "--no-relax", *extra], env=env)
    assert_one_line_error(result, output, message)
    assert n_nodes() == before
    assert_storage_consistent()


# ------------------------------------------------------------------------------------------ process failures


def last_reconstruction():
    qb = orm.QueryBuilder().append(orm.WorkflowNode, filters={"attributes.process_label": "ReconstructionWorkChain"},
                                   tag="wc").order_by({"wc": {"id": "desc"}})
    return qb.first()[0]


@pytest.mark.parametrize(
    "name, status, patterns",
    [
        ("mos2_pixel_x2.npy", 401, ["exit 401", "2.00× the size of the MoS2 template's", "check the pixel size"]),
        ("amorphous_carbon.npy", 400, ["exit 400", "No periodic lattice"]),
    ],
    ids=["pixel-size-x2", "amorphous"],
)
def test_science_failure_has_its_exit_code(setup_done, template, name, status, patterns):
    result, output = reconstruct([BAD / name, "--template", template, "--no-relax", "--protocol", "fast"])
    assert_one_line_error(result, output, *patterns)
    node = last_reconstruction()
    assert node.is_terminated and node.is_sealed and node.exit_status == status
    assert all(child.is_terminated for child in node.called_descendants)
    assert_storage_consistent()


# ------------------------------------------------------------------------------------------ LLM endpoint


def test_llm_endpoint_refusing_falls_back_to_the_rules(setup_done, template):
    """Nothing listens on the endpoint (port 9): the run is the rules' run, and every decision records why
    the LLM was not followed."""
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "k", "AUTOMAT_LLM_MODEL": "scripted"}
    result, log = reconstruct([BAD / "amorphous_carbon.npy", "--template", template, "--no-relax",
                               "--protocol", "fast", "--policy", "llm"], env=env)
    assert_one_line_error(result, log, "exit 400")
    trace = last_reconstruction().outputs.trace.get_list()
    assert trace[-1]["action"] == "give_up"
    assert all(d["policy"] == "llm->rules" and "llm rejected (APIConnectionError" in d["reason"] for d in trace), trace
    assert_storage_consistent()


def test_llm_garbage_and_timeout_fall_back_to_the_rules(setup_done):
    """The endpoint first answers HTML, then only after the client's timeout: each step is decided by the
    rules, with the reason recorded. (Not through the CLI: it has no option for the timeout.)"""
    from aiida.engine import run_get_node

    from aiida_automat.data.stem_image import StemImageData
    from aiida_automat.data.structures import atoms_to_structure
    from aiida_automat.imaging.io import read_image
    from aiida_automat.workflows.reconstruction import ReconstructionWorkChain
    from tests.fake_openai import FakeOpenAI, delay, garbage

    image = StemImageData(read_image(BAD / "amorphous_carbon.npy"))
    structure = atoms_to_structure(mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10))
    with FakeOpenAI([garbage("<html>oops</html>")] + [delay(2.0)] * 20) as server:
        builder = ReconstructionWorkChain.get_builder_from_protocol(
            image, protocol="fast", templates=[structure], overrides={"parameters": {"relax": False}},
            policy="llm", base_url=server.base_url, model="scripted", timeout_s=0.3)
        results, node = run_get_node(builder)
    assert node.exit_status == 400
    trace = results["trace"].get_list()
    assert len(trace) >= 2 and all(d["policy"] == "llm->rules" for d in trace), trace
    assert "timed out" not in trace[0]["reason"].lower()
    assert all("timed out" in d["reason"].lower() for d in trace[1:]), trace
