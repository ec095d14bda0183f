"""The bad-input corpus (``tests/data/bad``), file by file: each one ends in its own exception class with a
one-line message, before any heavy work and without touching a database.

Files that *read* fine but cannot give a structure (amorphous, a bulk crystal, a doubled pixel size) are
followed into the science core, where the failure must be specific (LatticeNotFound, NoCandidate) rather
than a confident wrong answer.
"""

from __future__ import annotations

import re
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from ase.build import mx2

from aiida_automat.agent.llm import parse_reply
from aiida_automat.cli.common import parse_elements
from aiida_automat.errors import AgentError, AutomatError, CalibrationError, ImageError, LatticeNotFound, NoCandidate
from aiida_automat.errors import UnknownElement
from aiida_automat.imaging.io import MAX_PIXELS, read_image
from aiida_automat.lattice.measure import measure_lattice
from aiida_automat.reconstruct.pipeline import reconstruct

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
sys.path.insert(0, str(BAD))
import make_bad_inputs  # noqa: E402

MOS2 = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10)

#: corpus file → (exception class, pattern its one-line message must contain)
READ_FAILURES = {
    "truncated.dm3": (ImageError, r"cannot read truncated\.dm3 as Gatan DigitalMicrograph: it is truncated"),
    "empty.dm3": (ImageError, r"empty\.dm3 is empty \(0 bytes\)"),
    "png_named.dm3": (ImageError, r"cannot read png_named\.dm3 as Gatan DigitalMicrograph"),
    "text_named.tif": (ImageError, r"cannot read text_named\.tif as TIFF"),
    "all_zero.npy": (ImageError, r"image is blank"),
    "nan_pixels.npy": (ImageError, r"image has 5 NaN/inf pixel\(s\)"),
    "tiny_8x8.npy": (ImageError, r"image is 8×8 px; at least 32 px per side"),
    "huge_header_16k.npy": (ImageError, r"16384×16384 = 268,435,456 values, which exceeds the pixel limit"),
    "huge_header_16k.png": (ImageError, r"huge_header_16k\.png exceeds the pixel limit"),
    "mos2_no_calibration.npy": (CalibrationError, r"has no pixel size calibration; give pixel_size_A"),
}
#: files that read and then fail in the science core (see the tests below)
SCIENCE_FAILURES = ("amorphous_carbon.npy", "bulk_si110.npy", "mos2_pixel_x2.npy")


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, repr(message)
    return message


def test_corpus_is_complete_and_regenerates_byte_for_byte():
    """The README's table, the generator and the stored files agree; nothing in the folder is unexplained."""
    made = make_bad_inputs.corpus()
    stored = {p.name: p.read_bytes() for p in BAD.iterdir() if p.is_file() and p.suffix != ".md" and p.suffix != ".py"}
    assert stored.keys() == made.keys()
    assert {name for name, content in made.items() if content != stored[name]} == set()
    readme = (BAD / "README.md").read_text()
    assert [name for name in made if f"`{Path(name).stem}." not in readme] == []  # sidecars: "(+ `.json`)"
    assert sum(len(c) for c in made.values()) < 300_000


@pytest.mark.parametrize("name", sorted(READ_FAILURES))
def test_unreadable_file_gives_its_error(name):
    cls, pattern = READ_FAILURES[name]
    start = time.perf_counter()
    with pytest.raises(AutomatError) as info:
        read_image(BAD / name)
    assert type(info.value) is cls
    assert re.search(pattern, one_line(info.value)), str(info.value)
    assert time.perf_counter() - start < 5.0  # refused from the header, not after loading


def test_crafted_dm3_reads_when_complete(tmp_path):
    """The truncated file fails because it is truncated: the same bytes, complete, are a valid DM3."""
    pattern = make_bad_inputs.hexagonal_pattern()
    (tmp_path / "complete.dm3").write_bytes(make_bad_inputs.dm3_bytes(pattern, pixel_nm=0.012))
    image = read_image(tmp_path / "complete.dm3")
    assert image.pixel_size_A == pytest.approx((0.12, 0.12))
    assert (image.microscope.mode, image.microscope.voltage_kV) == ("haadf", 60.0)
    np.testing.assert_array_equal(image.data, pattern)
    truncated = (BAD / "truncated.dm3").read_bytes()
    assert (tmp_path / "complete.dm3").read_bytes().startswith(truncated)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("kind", ["npy", "dm3"])
def test_16k_image_is_refused_before_it_is_loaded(tmp_path, kind):
    """A full-size 16384² file (sparse: no disk blocks) is refused from its header; nothing is allocated."""
    path = tmp_path / f"huge.{kind}"
    if kind == "npy":
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(16384, 16384)).flush()
    else:
        make_bad_inputs.write_sparse_dm3(path, (16384, 16384))
    assert path.stat().st_size > 2**30
    before, start = _rss_mb(), time.perf_counter()
    with pytest.raises(ImageError, match="exceeds the pixel limit of 67,108,864") as info:
        read_image(path, pixel_size_A=0.1)
    one_line(info.value)
    assert time.perf_counter() - start < 5.0
    assert _rss_mb() - before < 100  # the float32 array alone would be 1024 MB


def test_pixel_limit_is_a_keyword(tmp_path):
    np.save(tmp_path / "a.npy", make_bad_inputs.hexagonal_pattern())
    assert MAX_PIXELS == 8192 * 8192
    with pytest.raises(ImageError, match="64×64 = 4,096 values, which exceeds the pixel limit of 4,095"):
        read_image(tmp_path / "a.npy", pixel_size_A=0.1, max_pixels=4095)
    assert read_image(tmp_path / "a.npy", pixel_size_A=0.1, max_pixels=4096).shape == (64, 64)
    assert read_image(tmp_path / "a.npy", pixel_size_A=0.1, max_pixels=None).shape == (64, 64)
    for wrong in (0, -5, 2.5, True, "big"):
        with pytest.raises(AutomatError, match="max_pixels must be a positive integer"):
            read_image(tmp_path / "a.npy", pixel_size_A=0.1, max_pixels=wrong)


# ------------------------------------------------------------------------------------------ science


def test_amorphous_image_has_no_lattice():
    image = read_image(BAD / "amorphous_carbon.npy")
    with pytest.raises(LatticeNotFound, match="no periodic lattice") as info:
        measure_lattice(image)
    one_line(info.value)


def test_doubled_pixel_size_is_refused_with_the_reason():
    """The sidecar says 0.24 Å/px, the truth is 0.12: the lattice reads 6.36 Å, twice MoS2's."""
    image = read_image(BAD / "mos2_pixel_x2.npy")
    assert image.pixel_size_A == pytest.approx((0.24, 0.24))
    lattice = measure_lattice(image)
    assert lattice.a_A == pytest.approx(6.36, rel=0.02)
    with pytest.raises(NoCandidate, match=r"2\.00× the size of the MoS2 template's.*check the pixel size") as info:
        reconstruct(image, MOS2, lattice.vectors_px)
    one_line(info.value)
    # control: the same pixels with the true calibration reconstruct as MoS2
    good = read_image(BAD / "mos2_no_calibration.npy", pixel_size_A=0.12)
    rec = reconstruct(good, MOS2, measure_lattice(good).vectors_px)
    assert rec.diagnostics()["formula"] == "MoS2" and rec.confidence > 0.9


def test_bulk_crystal_in_zone_axis_is_not_a_monolayer():
    """Si[110] (3.33 Å, 109.5°) once became MoS2 (3.18 Å, 120°) at confidence 0.87: an 11 % cell-shape
    mismatch was taken for scan distortion. Beyond MAX_ANISOTROPY the template is refused."""
    image = read_image(BAD / "bulk_si110.npy")
    lattice = measure_lattice(image)
    assert (lattice.a_A, lattice.gamma_deg) == (pytest.approx(3.33, abs=0.05), pytest.approx(109.5, abs=1.0))
    with pytest.raises(NoCandidate):
        reconstruct(image, MOS2, lattice.vectors_px)


# ------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("value", ["Mo,Xx", "Q", "Mo,S,Unobtainium"])
def test_unknown_element_is_refused(value):
    with pytest.raises(UnknownElement, match="is not a chemical element") as info:
        parse_elements(value)
    one_line(info.value)


def _message(tool_calls, content=None):
    return types.SimpleNamespace(content=content, tool_calls=tool_calls)


def _call(name, arguments):
    return types.SimpleNamespace(function=types.SimpleNamespace(name=name, arguments=arguments))


@pytest.mark.parametrize(
    "message, pattern",
    [
        (_message(7, content={"not": "text"}), "exactly one tool call, got a int"),
        (_message([{"function": 3}]), "no function name"),
        (_message([_call(None, "{}")]), "no function name"),
        (_message([_call("retrieve", "[" * 100000 + "]" * 100000)]), "not JSON"),
        (_message([_call("retrieve", '{"k": "five"}')]), "'k' of retrieve must be an integer"),
        (_message([_call("retrieve", '{"k": 500}')]), "out of range"),
        (_message([_call("relax", '{"potential": 5}')]), "'potential' of relax must be a string"),
        (_message([_call("give_up", '{"reason": {"nested": 1}}')]), "'reason' of give_up must be a string"),
        (_message([_call("denoise", '{"setting": "extreme"}')]), "must be one of"),
    ],
    ids=["tool-calls-not-a-list", "function-not-an-object", "no-name", "deep-json", "k-text", "k-range",
         "potential-number", "reason-object", "enum"],
)
def test_garbage_llm_reply_is_an_agent_error(message, pattern):
    """What a misbehaving endpoint can put in a reply: the documented rejection, never another exception.
    (Refused connections, timeouts and HTTP garbage are covered end to end in test_agent_llm.py.)"""
    with pytest.raises(AgentError, match=pattern) as info:
        parse_reply(message)
    one_line(info.value)
