"""Template library: structure standardisation, build, index round trip, build key."""

from __future__ import annotations

import numpy as np
import pytest

from aiida_automat.errors import LibraryError
from aiida_automat.library.index import TemplateLibrary
from aiida_automat.library.structures import classify_lattice, gauss_reduce, load_structure_set, standardise_2d

from ._library_fixtures import TEST_IDS, small_library, small_templates


@pytest.fixture(scope="module")
def lib():
    return small_library()


def _mos2():
    return next(t for t in small_templates() if t.template_id == "MoS2-44a10f28")


def test_gauss_reduce_hexagonal():
    a, b = gauss_reduce(np.array([3.0, 0.0]), np.array([4.5, 2.598076]))
    assert np.isclose(np.linalg.norm(a), 3.0) and np.isclose(np.linalg.norm(b), 3.0, atol=1e-5)
    assert a[0] * b[1] - a[1] * b[0] > 0
    assert classify_lattice(np.array([a, b])) == "hexagonal"
    assert classify_lattice(np.array([[3.0, 0], [0, 4.0]])) == "rectangular"
    assert classify_lattice(np.array([[3.0, 0], [0, 3.0]])) == "square"


def test_standardise_supercell_and_rotation_give_primitive_cell():
    from ase.build import make_supercell

    mos2 = _mos2().atoms
    sup = make_supercell(mos2, np.diag([2, 3, 1]))
    sup.rotate(23, "z", rotate_cell=True)
    std = standardise_2d(sup)
    assert len(std) == 3
    assert abs(std.cell[0, 1]) < 1e-9 and std.cell[0, 0] > 0  # a along x
    assert np.allclose(sorted(np.linalg.norm(std.cell[:2, :2], axis=1)), sorted(np.linalg.norm(mos2.cell[:2, :2], axis=1)), atol=1e-4)
    assert std.get_chemical_formula() == mos2.get_chemical_formula()


def test_load_from_folder_of_cif_and_extxyz(tmp_path):
    from ase.io import write

    mos2 = _mos2().atoms.copy()
    mos2.pbc = True
    write(tmp_path / "mos2.cif", mos2)
    write(tmp_path / "mos2_copy.extxyz", mos2)
    (tmp_path / "notes.txt").write_text("ignored")
    ts = load_structure_set(tmp_path)
    assert len(ts) == 2 and {t.formula for t in ts} == {"MoS2"}
    assert all(t.lattice_type == "hexagonal" and t.anonymous_formula == "AB2" for t in ts)
    with pytest.raises(LibraryError):
        load_structure_set(tmp_path / "missing")


def test_build_and_roundtrip(lib, tmp_path):
    assert len(lib) == len(TEST_IDS)
    assert set(lib.modes) == {"adf", "idpc"}
    m = len(lib.hk)
    assert lib.coefficients["adf"].shape == (len(lib), m)
    # a template's structure comes back from the index alone
    at = lib.atoms("WS2-231d4b60")
    assert at.get_chemical_formula() == "S2W" and tuple(at.pbc) == (True, True, False)
    sha = lib.save(tmp_path / "lib.npz")
    back = TemplateLibrary.load(tmp_path / "lib.npz", expected_sha256=sha)
    assert back.build_key == lib.build_key and back.ids.tolist() == lib.ids.tolist()
    assert np.allclose(back.coefficients["idpc"], lib.coefficients["idpc"], rtol=1e-5, atol=1e-12)
    with pytest.raises(LibraryError, match="sha256"):
        TemplateLibrary.load(tmp_path / "lib.npz", expected_sha256="0" * 64)
    sub = lib.subset([0, 2])
    assert len(sub) == 2 and sub.atoms(1).get_chemical_formula() == lib.atoms(2).get_chemical_formula()


def test_build_key_tracks_inputs():
    from aiida_automat.library.build import build_key, library_microscopes

    ts = small_templates()[:3]
    k1 = build_key(ts, library_microscopes(("adf",)))
    assert k1 == build_key(ts, library_microscopes(("adf",)))
    assert k1 != build_key(ts, library_microscopes(("adf",), voltage_kV=80.0))
    assert k1 != build_key(ts[:2], library_microscopes(("adf",)))
    assert k1 != build_key(ts, library_microscopes(("adf", "idpc")))


def test_descriptor_contrast_heavy_vs_light(lib):
    """WS2 and MoS2 share lattice and motif; their reflection-family ratio differs (W heavier than Mo)."""
    x_w = np.abs(lib.coefficients["adf"][lib.index_of("WS2-231d4b60")])
    x_m = np.abs(lib.coefficients["adf"][lib.index_of("MoS2-44a10f28")])
    assert x_w.max() > 1.5 * x_m.max()  # absolute Z-contrast
    hk = lib.hk
    i10 = np.flatnonzero((hk[:, 0] == 1) & (hk[:, 1] == 0))[0]
    i11 = np.flatnonzero((hk[:, 0] == 1) & (hk[:, 1] == 1))[0]
    r_w, r_m = x_w[i10] / x_w[i11], x_m[i10] / x_m[i11]
    assert abs(r_w - r_m) > 0.05


def test_subsets_of_one_size_have_their_own_keys():
    lib = small_library(modes=("adf",))
    a, b = lib.subset([0, 1]), lib.subset([0, 2])
    assert a.build_key != b.build_key and a.build_key != lib.build_key
    assert lib.subset([0, 1]).build_key == a.build_key
