"""bench: generate a tiny set (fast model), run the pipelines on it, check results and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

MOS2_ID = "MoS2-44a10f28"


@pytest.fixture(scope="module")
def mos2():
    from aiida_automat.library.structures import load_structure_set

    atoms = load_structure_set(ids=[MOS2_ID])[0].atoms.copy()
    atoms.info.update(material_id="2dm-test-mos2", energy_per_atom=-7.3)
    return atoms


@pytest.fixture(scope="module")
def bench_set(tmp_path_factory, mos2):
    from aiida_automat.bench.generate import generate

    out = tmp_path_factory.mktemp("bench")
    res = generate(None, out, structures=[mos2], n=3, modes=("adf",), doses=(6e4,), seed=3, size=128, method="fast")
    return out, res


def test_generate_layout_and_resume(bench_set, mos2):
    from ase.io import read

    from aiida_automat.bench.generate import generate, unstrained
    from aiida_automat.imaging.io import load_stem_image

    out, res = bench_set
    assert res.n_structures == 1 and res.n_images == 1 and res.n_written == 1 and res.n_failed == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["structures"][0]["tier"] == "binary" and manifest["structures"][0]["formula"] == "MoS2"
    truth = read(out / "truth" / "2dm-test-mos2.extxyz")
    assert truth.info["material_id"] == "2dm-test-mos2" and truth.info["energy_per_atom"] == pytest.approx(-7.3)
    eps = truth.info["strain"]
    assert abs(eps) <= 0.02
    assert np.allclose(unstrained(truth).cell[:2, :2], mos2.cell[:2, :2], atol=1e-6)
    img = load_stem_image(out / "images" / "2dm-test-mos2_adf_60000.npz")
    assert img.shape == (128, 128) and img.dose_e_per_A2 == 6e4
    assert img.metadata["bench"]["material_id"] == "2dm-test-mos2"
    # resume: nothing rewritten, identical file
    before = (out / "images" / "2dm-test-mos2_adf_60000.npz").stat().st_mtime_ns
    again = generate(None, out, structures=[mos2], n=3, modes=("adf",), doses=(6e4,), seed=3, size=128, method="fast")
    assert again.n_written == 0 and again.n_skipped == 1
    assert (out / "images" / "2dm-test-mos2_adf_60000.npz").stat().st_mtime_ns == before


def test_generate_refuses_other_settings(bench_set, mos2):
    from aiida_automat.bench.generate import generate
    from aiida_automat.errors import AutomatError

    out, _ = bench_set
    with pytest.raises(AutomatError, match="other settings"):
        generate(None, out, structures=[mos2], n=3, modes=("adf",), doses=(1e4,), seed=3, size=128, method="fast")


def test_pick_structures_tiers():
    from aiida_automat.bench.generate import default_structures_path, pick_structures

    chosen = pick_structures(default_structures_path(), 6, seed=1)
    tiers = [a.info["tier"] for a in chosen]
    assert tiers.count("unary") == tiers.count("binary") == tiers.count("ternary") == 2
    again = pick_structures(default_structures_path(), 6, seed=1)
    assert [a.info["bench_id"] for a in again] == [a.info["bench_id"] for a in chosen]


def test_run_oracle_and_pipeline(bench_set, mos2):
    from aiida_automat.bench.run import RESULT_KEYS, run
    from aiida_automat.library.build import build_library
    from aiida_automat.library.structures import load_structure_set

    out, _ = bench_set
    templates = load_structure_set(ids=[MOS2_ID, "WS2-231d4b60", "BN-0e329ca7", "C2-fdcf3c57"])
    lib = build_library(templates, name="t", modes=("adf",), voltage_kV=80.0, semiangle_mrad=30.0)
    res = run(out, library=lib, energy=False, k=2)
    assert set(RESULT_KEYS) <= set(res)
    assert set(res["summary"]) == {"pipeline", "oracle_template", "automat_baseline"}
    for name in res["summary"]:
        assert {"overall", "by_tier", "by_mode", "by_dose", "by_mode_dose"} <= set(res["summary"][name])
    rows = {r["pipeline"]: r for r in res["rows"]}
    assert rows["oracle_template"]["success"], rows["oracle_template"]
    assert rows["oracle_template"]["rmsd_A"] < 0.1 and rows["oracle_template"]["lattice_err_pct"] < 1.0
    assert rows["pipeline"]["success"] and rows["pipeline"]["template_id"] == MOS2_ID
    assert rows["pipeline"]["failure"] is None
    assert "retrieval_s" in rows["pipeline"]["timings"] and "verification_s" in rows["pipeline"]["timings"]
    assert (out / "results.json").is_file()
    report = (out / "report.md").read_text()
    assert "oracle_template" in report and "Failures by type" in report
    # excluding the truth's id from the library leaves MoS2 in it here (the id differs): still succeeds
    res2 = run(out, library=lib, energy=False, k=2, pipelines=("pipeline",), exclude_from_library=True, write=False)
    assert res2["library"]["n_templates"] == 4


def test_ranking_score_matches_verify_candidate_recipe(bench_set):
    """The bench score is verify()'s fitted-blur NCC minus the strain penalty (as verify_candidate)."""
    from aiida_automat.bench.generate import unstrained
    from aiida_automat.bench.pipeline import ranking_score
    from aiida_automat.calculations.functions import STRAIN_FREE, STRAIN_WEIGHT
    from aiida_automat.imaging.io import load_stem_image
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.reconstruct.pipeline import reconstruct
    from ase.io import read

    out, _ = bench_set
    img = load_stem_image(out / "images" / "2dm-test-mos2_adf_60000.npz")
    truth = read(out / "truth" / "2dm-test-mos2.extxyz")
    lat = measure_lattice(img)
    rec = reconstruct(img, unstrained(truth), lat.vectors_px)
    s = ranking_score(img, lat.vectors_px, rec)
    assert 0.8 < s["score"] <= 1.0
    assert s["ranking_score"] == pytest.approx(s["score"] - STRAIN_WEIGHT * max(0.0, s["template_strain"] - STRAIN_FREE))


def test_cli_bench_errors_one_line(tmp_path):
    from click.testing import CliRunner

    from aiida_automat.cli.bench import bench_group

    r = CliRunner().invoke(bench_group, ["run", str(tmp_path), "--no-energy"])
    assert r.exit_code == 1 and "manifest.json" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(bench_group, ["generate", "--out", str(tmp_path / "x"), "--doses", "abc"])
    assert r.exit_code == 2
