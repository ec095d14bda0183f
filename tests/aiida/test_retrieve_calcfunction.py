"""``automat.retrieve`` calcfunction and the library index node (sha256, group, get_or_build caching)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.core._library_fixtures import fast, small_templates

pytestmark = pytest.mark.aiida

IDS = ["MoS2-44a10f28", "WS2-231d4b60", "MoSe2-a6703220", "BN-0e329ca7", "C2-fdcf3c57"]


@pytest.fixture(scope="module")
def atoms_list():
    out = []
    for t in small_templates():
        if t.template_id in IDS:
            a = t.atoms.copy()
            a.info["template_id"] = t.template_id
            out.append(a)
    return out


def test_library_node_cached_and_retrieve(aiida_profile_clean, atoms_list):
    from aiida import orm

    from aiida_automat.calculations.retrieve import retrieve
    from aiida_automat.data.library import GROUP_PREFIX, TemplateLibraryData, get_or_build
    from aiida_automat.data.stem_image import StemImageData

    node = get_or_build(atoms_list, name="tiny", modes=("adf",))
    assert node.is_stored and node.sha256 and node.base.attributes.get("n_templates") == len(IDS)
    again = get_or_build(atoms_list, name="tiny", modes=("adf",))
    assert again.uuid == node.uuid  # same inputs: not rebuilt
    group = orm.load_group(f"{GROUP_PREFIX}tiny")
    assert len([n for n in group.nodes if isinstance(n, orm.StructureData)]) == len(IDS)
    assert TemplateLibraryData.from_name("tiny").uuid == node.uuid

    lib = node.load_library()
    img = fast(lib, "WS2-231d4b60", "adf", px_err=0.03)
    res, calc = retrieve.run_get_node(StemImageData(img), node, orm.Dict({"k": 3}))
    assert calc.is_finished_ok
    d = res["result"].get_dict()
    best = d["candidates"][0]
    assert best["template_id"] == "WS2-231d4b60"
    assert best["structure_uuid"] == node.structure_uuids["WS2-231d4b60"]
    assert res["candidate_1"].get_formula() == "S2W"
    assert len([k for k in res if k.startswith("candidate_")]) == 3


def test_retrieve_exit_codes(aiida_profile_clean, atoms_list):
    from aiida import orm

    from aiida_automat.calculations.retrieve import retrieve
    from aiida_automat.data.library import get_or_build
    from aiida_automat.data.stem_image import StemImageData
    from aiida_automat.exit_codes import status_for_label

    node = get_or_build(atoms_list[:3], name="tiny3", modes=("adf",), store_structures=False)
    lib = node.load_library()
    img = fast(lib, "MoS2-44a10f28", "adf").replace(microscope=lib.microscopes["adf"].replace(mode="idpc"))
    _, calc = retrieve.run_get_node(StemImageData(img), node)
    assert calc.exit_status == status_for_label("ERROR_LIBRARY")
    _, calc = retrieve.run_get_node(StemImageData(img), node, orm.Dict({"bogus": 1}))
    assert calc.exit_status == status_for_label("ERROR_INVALID_INPUT")
