"""``bench run --library NAME``: a stored ``TemplateLibraryData`` found by name, a clear error otherwise."""

from __future__ import annotations

import json

import pytest

IDS = ["MoS2-44a10f28", "WS2-231d4b60", "BN-0e329ca7"]


@pytest.fixture(scope="module")
def stored_library(aiida_profile):
    from aiida_automat.data.library import TemplateLibraryData
    from aiida_automat.library.build import build_library
    from aiida_automat.library.structures import load_structure_set

    lib = build_library(load_structure_set(ids=IDS), name="bench-tiny", modes=("adf",), voltage_kV=80.0, semiangle_mrad=30.0)
    TemplateLibraryData.from_library(lib).store()
    return lib


def test_resolve_library_by_name(stored_library):
    from aiida_automat.cli.bench import resolve_library
    from aiida_automat.errors import LibraryError

    lib = resolve_library("bench-tiny")
    assert lib.build_key == stored_library.build_key and lib.ids.tolist() == stored_library.ids.tolist()
    assert resolve_library("default") == "default"
    with pytest.raises(LibraryError, match="no template library named 'nope'"):
        resolve_library("nope")


def test_bench_run_with_named_library(stored_library, tmp_path):
    from click.testing import CliRunner

    from aiida_automat.bench.generate import generate
    from aiida_automat.cli.bench import bench_group
    from aiida_automat.library.structures import load_structure_set

    mos2 = load_structure_set(ids=IDS[:1])[0].atoms
    generate(None, tmp_path, structures=[mos2], n=3, modes=("adf",), doses=(6e4,), seed=2, size=128, method="fast")
    base = ["run", str(tmp_path), "--no-energy", "--no-plots", "--pipelines", "pipeline", "--k", "2"]
    r = CliRunner().invoke(bench_group, base + ["--library", "bench-tiny"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["options"]["library"] == "bench-tiny" and res["library"]["n_templates"] == 3
    (row,) = res["rows"]
    assert row["success"] and row["template_id"] == IDS[0]
    r = CliRunner().invoke(bench_group, base + ["--library", "nope"])
    assert r.exit_code == 1 and "no template library named 'nope'" in r.output and "Traceback" not in r.output
