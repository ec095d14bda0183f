"""Property-based fuzzing of the two places where untrusted bytes enter: image files and LLM replies.

The property is the package's error contract: ``read_image`` returns a validated ``StemImage`` or raises an
``AutomatError`` subclass with a one-line message, whatever the file holds; ``parse_reply`` returns a Decision
whose arguments match the tool schema, or raises ``AgentError``. Any other exception is a bug in the reader
or the parser. Random bytes alone rarely pass a format's magic number, so most byte examples are *mutations*
(cuts, overwritten bytes) of a small valid file of the same format, which drives the parsers deep into their
headers. Examples are derandomized (the same in CI and on every machine) and bounded in number.
"""

from __future__ import annotations

import io
import json
import math
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from openai._models import construct_type  # how the client builds replies: without validating them
from openai.types.chat import ChatCompletionMessage

from aiida_automat.agent.actions import ACTIONS, ARGUMENTS, Decision, validate
from aiida_automat.agent.llm import parse_reply
from aiida_automat.agent.state import AgentState, Candidate
from aiida_automat.errors import AgentError, AutomatError
from aiida_automat.imaging.image import MIN_SIZE_PX, StemImage
from aiida_automat.imaging.io import read_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "bad"))
import make_bad_inputs as corpus  # noqa: E402

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXTENSIONS = (".dm3", ".dm4", ".tif", ".png", ".npy", ".npz", ".emd", ".ser")
WORK = Path(tempfile.mkdtemp(prefix="automat-fuzz-"))
#: examples tried per target, reported in docs/_sections/bench_reliability_inputs.md
TRIED: dict[str, int] = {}


def _seed_files() -> dict[str, bytes]:
    """One small valid file per format (calibrated where the format can say so)."""
    import tifffile
    from PIL import Image
    from rsciio import emd

    pattern = corpus.hexagonal_pattern((40, 40))
    seeds = {".dm3": corpus.dm3_bytes(pattern, 0.012), ".dm4": corpus.dm3_bytes(pattern, 0.012)}
    buf = io.BytesIO()
    tifffile.imwrite(buf, pattern, resolution=(100.0, 100.0))
    seeds[".tif"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((60 * pattern).astype(np.uint8)).save(buf, format="PNG")
    seeds[".png"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, pattern)
    seeds[".npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, image=pattern)
    seeds[".npz"] = buf.getvalue()
    axes = [{"name": n, "size": 40, "scale": 12.0, "offset": 0.0, "units": "pm", "navigate": False} for n in "yx"]
    emd.file_writer(str(WORK / "seed.emd"), {"data": pattern, "axes": axes, "original_metadata": {},
                                             "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}}})
    seeds[".emd"] = (WORK / "seed.emd").read_bytes()
    seeds[".ser"] = b"\x49\x49\x97\x01\x10\x02" + bytes(range(256)) * 4  # TIA magic, then junk
    return seeds


SEEDS = _seed_files()
for _ext, _content in SEEDS.items():  # import every reader (and dask) before the memory baseline is taken
    (WORK / f"warm{_ext}").write_bytes(_content)
    try:
        read_image(WORK / f"warm{_ext}", pixel_size_A=0.12)
    except AutomatError:
        pass


_BASELINE_KB: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _memory_baseline():
    """The peak RSS when this module's first test starts (readers, dask and openai already imported)."""
    _BASELINE_KB.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _count(target: str) -> None:
    TRIED[target] = TRIED.get(target, 0) + 1


def _check_outcome(path: Path, **kwargs) -> None:
    """The contract: a valid image or a one-line AutomatError; anything else propagates and fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = read_image(path, **kwargs)
        except AutomatError as exc:
            message = str(exc)
            assert message and "\n" not in message, repr(message)
            event(f"{path.suffix}: {type(exc).__name__}")  # --hypothesis-show-statistics shows the mix
            return
    event(f"{path.suffix}: read")
    assert isinstance(image, StemImage)
    assert image.data.ndim == 2 and min(image.shape) >= MIN_SIZE_PX
    assert np.all(np.isfinite(image.data)) and np.ptp(image.data) > 0
    assert all(0 < p < 50 for p in image.pixel_size_A)


@st.composite
def mutated_files(draw):
    ext = draw(st.sampled_from(EXTENSIONS))
    seed = bytearray(SEEDS[ext])
    kind = draw(st.sampled_from(["random", "cut", "overwrite", "cut+overwrite"]))
    if kind == "random":
        return ext, draw(st.binary(min_size=1, max_size=2048))
    if "cut" in kind:
        seed = seed[: draw(st.integers(1, len(seed)))]
    if "overwrite" in kind:
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(seed) - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            seed[at: at + len(chunk)] = chunk
    return ext, bytes(seed)


@FUZZ
@given(case=mutated_files(), calibrated=st.booleans())
def test_read_image_survives_random_and_mutated_bytes(case, calibrated):
    ext, content = case
    _count("read_image: random/mutated bytes")
    path = WORK / f"bytes{ext}"
    path.write_bytes(content)
    _check_outcome(path, pixel_size_A=0.12 if calibrated else None)


DTYPES = st.sampled_from(["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                          "float16", "float32", "float64", "complex64", "complex128"])
IMAGE_LIKE_SHAPES = st.one_of(
    st.tuples(st.integers(24, 80), st.integers(24, 80)),  # images, some below the 32 px minimum
    st.tuples(st.integers(1, 3), st.integers(30, 64), st.integers(30, 64)),  # frame stacks
    st.tuples(st.integers(30, 64), st.integers(30, 64), st.sampled_from([3, 4])),  # colour
)
ANY_SHAPE = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40).filter(lambda s: math.prod(s) <= 40000)


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(DTYPES))
    shape = draw(IMAGE_LIKE_SHAPES if draw(st.integers(0, 3)) else ANY_SHAPE)
    kind = draw(st.sampled_from(["elements", "constant", "smooth"]))
    if kind == "smooth" and len(shape) >= 2 and dtype.kind == "f":
        y, x = np.indices(shape[-2:])
        data = np.broadcast_to(np.sin(x / 3.0) + np.cos(y / 4.0) + 3.0, shape).astype(dtype)
        if draw(st.booleans()) and data.size:
            data = data.copy()
            data.flat[draw(st.integers(0, data.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return data
    if kind == "constant":
        return np.zeros(shape, dtype=dtype)
    return draw(hnp.arrays(dtype, shape))


@FUZZ
@given(data=arrays(), container=st.sampled_from(["npy", "npz-image", "npz-other", "npz-two"]),
       sidecar=st.sampled_from([None, {"field_of_view_x": 1.2, "field_of_view_units": "nm"},
                                {"pixel_size_x": 0.12, "pixel_size_y": 0.1, "pixel_size_units": "Å"}]))
def test_read_image_survives_random_arrays(data, container, sidecar):
    _count("read_image: random arrays")
    stem = WORK / "array"
    stem.with_suffix(".json").unlink(missing_ok=True)
    if sidecar is not None:
        stem.with_suffix(".json").write_text(json.dumps(sidecar))
    if container == "npy":
        path = stem.with_suffix(".npy")
        np.save(path, data)
    else:
        path = stem.with_suffix(".npz")
        arrays_in = {"npz-image": {"image": data}, "npz-other": {"frames": data},
                     "npz-two": {"a": data, "b": data}}[container]
        np.savez(path, **arrays_in)
    _check_outcome(path, pixel_size_A=None if sidecar else 0.1)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SIDECAR_KEYS = st.sampled_from(["field_of_view_x", "field_of_view_y", "field_of_view", "field_of_view_units",
                                "pixel_size", "pixel_size_x_nm", "units", "voltage", "convergence_semiangle",
                                "experiment_type", "detector"])


NUMBER = st.one_of(st.floats(-10, 100), st.integers(-5, 5000), st.just(0), st.text(max_size=6),
                   st.sampled_from(["1.2", "3 nm", "nan", "1e400"]))
UNITS = st.sampled_from(["nm", "Å", "A", "pm", "µm", "m", "px", "1/nm", "", "inch"]) | st.text(max_size=4)
PLAUSIBLE_SIDECAR = st.fixed_dictionaries({}, optional={
    "field_of_view_x": NUMBER, "field_of_view_y": NUMBER, "field_of_view_units": UNITS,
    "pixel_size": NUMBER, "pixel_size_units": UNITS, "voltage": NUMBER | UNITS, "experiment_type": st.text(max_size=8),
    "spatial_info": st.fixed_dictionaries({"field_of_view_x": NUMBER, "field_of_view_units": UNITS}),
})


VALID_SIDECAR = st.fixed_dictionaries(
    {"field_of_view_x": st.floats(0.3, 5.0), "field_of_view_units": st.sampled_from(["nm", "Å", "angstrom", "pm"])},
    optional={"field_of_view_y": st.floats(0.3, 5.0), "voltage": NUMBER | UNITS, "convergence_semiangle": NUMBER,
              "experiment_type": st.sampled_from(["HAADF-STEM", "iDPC", "ABF", "mystery"])},
)


@FUZZ
@given(tree=st.one_of(VALID_SIDECAR, PLAUSIBLE_SIDECAR, st.dictionaries(SIDECAR_KEYS, JSON, max_size=6), JSON))
def test_read_image_survives_random_sidecars(tree):
    _count("read_image: random sidecars")
    path = WORK / "sidecar.npy"
    if not path.exists():
        np.save(path, corpus.hexagonal_pattern((40, 40)))
    path.with_suffix(".json").write_text(json.dumps(tree))
    _check_outcome(path)


# ------------------------------------------------------------------------------------------ LLM replies


def _arguments_for(action, *, valid_only=False):
    schema = ARGUMENTS.get(action, {})
    valid = st.fixed_dictionaries({}, optional={
        key: (st.sampled_from(spec["enum"]) if "enum" in spec else
              st.integers(spec.get("minimum", -3), spec.get("maximum", 60)) if spec.get("type") == "integer" else
              st.text(max_size=10))
        for key, spec in schema.items()
    })
    if valid_only:
        return valid
    return st.one_of(valid, st.dictionaries(st.sampled_from([*schema, "reason", "k", "candidate", "x"]), JSON, max_size=3))


@st.composite
def raw_arguments(draw, action):
    kind = draw(st.sampled_from(["json", "json", "text", "value", "deep"]))
    if kind == "json":
        return json.dumps(draw(_arguments_for(action)))
    if kind == "text":
        return draw(st.text(max_size=40))
    if kind == "deep":
        depth = draw(st.sampled_from([10, 5000, 100000]))
        return "[" * depth + "]" * depth
    return draw(JSON)


@st.composite
def replies(draw):
    """A chat-completion message as JSON, built the way the openai client builds it (no validation)."""
    action = draw(st.sampled_from(ACTIONS) | st.text(max_size=12))
    if draw(st.integers(0, 2)):  # well-formed: one call of a known tool, arguments from its schema
        arguments = json.dumps(draw(_arguments_for(action if action in ACTIONS else "give_up", valid_only=True)))
        call = {"id": "c1", "type": "function", "function": {"name": action, "arguments": arguments}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return construct_type(type_=ChatCompletionMessage, value=message)
    call = st.fixed_dictionaries({
        "id": st.text(max_size=8),
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.just(action) | JSON, "arguments": raw_arguments(action)}) | JSON,
    })
    tool_calls = st.one_of(st.none(), st.lists(call, min_size=1, max_size=1), st.lists(call, max_size=3), JSON)
    message = {"role": "assistant", "content": draw(st.none() | st.text(max_size=30) | JSON),
               "tool_calls": draw(tool_calls)}
    return construct_type(type_=ChatCompletionMessage, value=message)


STATES = [
    AgentState(noise_level=0.05),
    AgentState(lattice={"a": 3.18, "b": 3.18, "gamma": 120.0}, can_denoise=True),
    AgentState(lattice={"a": 3.18, "b": 3.18, "gamma": 120.0}, retrieve_attempts=1, relaxed=True, dft_available=True,
               candidates=(Candidate("a", "MoS2", 0.9, status="verified", verification_score=0.9),)),
    AgentState(lattice={"a": 3.18, "b": 3.18, "gamma": 120.0}, retrieve_attempts=1,
               candidates=(Candidate("a", "MoS2", 0.9, status="verified", verification_score=0.9),
                           Candidate("b", "WS2", 0.8), Candidate("c", "MoSe2", 0.7, status="reconstructed"))),
]


def _conforms(decision: Decision) -> bool:
    for key, value in decision.arguments.items():
        spec = ARGUMENTS[decision.action][key]
        if spec.get("type") == "string" and not isinstance(value, str):
            return False
        if spec.get("type") == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
            return False
    return True


@FUZZ
@given(message=replies(), state=st.sampled_from(STATES))
def test_parse_reply_gives_a_valid_action_or_agent_error(message, state):
    _count("llm.parse_reply + validate")
    try:
        decision = validate(state, parse_reply(message))
    except AgentError as exc:
        assert "\n" not in str(exc)
        event("AgentError")
        return
    event("valid decision")
    assert decision.action in ACTIONS and _conforms(decision)
    json.dumps(decision.as_dict())  # what the decide calcfunction stores


# ------------------------------------------------------------------------------------------ memory


def test_fuzzing_memory_stays_bounded():
    """Runs after the fuzz tests above (file order): reading hundreds of broken files must not leak or balloon.

    ``ru_maxrss`` is the process's peak; the bound is on its growth since this module's first test started,
    i.e. over what pytest, numpy, the readers and the openai client need anyway (run this file alone for the
    figure: in a longer session an earlier, higher peak hides the growth).
    """
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _BASELINE_KB[0]) / 1024
    TRIED["peak RSS growth (MB)"] = round(growth_mb, 1)
    print(f"\nfuzz summary: {json.dumps(TRIED)}")  # quoted in docs/_sections/bench_reliability_inputs.md
    assert sum(v for k, v in TRIED.items() if "RSS" not in k) >= 4 * 100, TRIED
    assert growth_mb < 150, f"peak RSS grew by {growth_mb:.0f} MB while fuzzing"

