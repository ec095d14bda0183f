"""``StemImageData``: the one conversion between the core ``StemImage`` and a stored node."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from aiida_automat.data.stem_image import StemImageData
from aiida_automat.errors import ImageError
from aiida_automat.imaging.image import StemImage
from aiida_automat.imaging.microscope import Microscope


@pytest.fixture
def stem_image(rng):
    return StemImage(
        data=rng.standard_normal((48, 64)),
        pixel_size_A=(0.11, 0.125),
        microscope=Microscope(mode="abf", voltage_kV=80.0, semiangle_mrad=30.0, defocus_A=15.0, Cs_A=1e4,
                              source_size_A=0.5),
        dose_e_per_A2=2.0e4,
        source="scan.dm4",
        sha256="cd" * 32,
        metadata={"calibration_source": "file", "frame_shifts_px": [[0.0, 0.0], [1.5, -2.0]], "title": "ABF"},
    )


def _assert_same(a: StemImage, b: StemImage):
    assert a.data.tobytes() == b.data.tobytes() and b.data.dtype == np.float32
    for field in ("pixel_size_A", "microscope", "dose_e_per_A2", "source", "sha256"):
        assert getattr(a, field) == getattr(b, field), field
    assert dict(a.metadata) == dict(b.metadata)


def test_round_trip_before_and_after_storing(stem_image):
    node = StemImageData.from_stem_image(stem_image)
    _assert_same(stem_image, node.to_stem_image())
    node.store()
    from aiida.orm import load_node

    _assert_same(stem_image, load_node(node.pk).to_stem_image())


def test_stored_attributes_are_queryable(stem_image):
    from aiida.orm import QueryBuilder

    node = StemImageData(stem_image).store()
    attrs = node.base.attributes.all
    assert attrs["pixel_size_A"] == [0.11, 0.125]
    assert (attrs["mode"], attrs["voltage_kV"], attrs["semiangle_mrad"]) == ("abf", 80.0, 30.0)
    assert (attrs["defocus_A"], attrs["Cs_A"], attrs["source_size_A"]) == (15.0, 1e4, 0.5)
    assert (attrs["detector_inner_mrad"], attrs["detector_outer_mrad"]) == (15.0, 30.0)
    assert attrs["dose_e_per_A2"] == 2.0e4 and attrs["source"] == "scan.dm4" and attrs["sha256"] == "cd" * 32
    assert attrs["metadata"]["title"] == "ABF"
    assert node.get_array("image").dtype == np.float32 and node.shape == (48, 64)
    found = QueryBuilder().append(StemImageData, filters={"attributes.mode": "abf", "attributes.sha256": "cd" * 32}).all(flat=True)
    assert node.uuid in {n.uuid for n in found}


def test_sha256_of_an_array_image_is_the_array_hash(rng):
    image = StemImage(data=rng.random((40, 40)), pixel_size_A=0.1)
    node = StemImageData(image).store()
    assert node.sha256 == hashlib.sha256(image.data.tobytes()).hexdigest()


def test_from_file_keeps_file_hash_and_source(tmp_path, rng):
    path = tmp_path / "frame.npy"
    np.save(path, rng.random((40, 40)))
    node = StemImageData.from_file(path, pixel_size_A=0.2, mode="haadf", voltage_kV=60)
    assert node.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert node.source == "frame.npy" and node.pixel_size_A == (0.2, 0.2)
    assert node.metadata["calibration_source"] == "user"
    node.store()


def test_from_real_dm3(shared_data):
    node = StemImageData.from_file(shared_data / "real/mos2_temul/example_Se_implanted_MoS2.dm3").store()
    assert node.pixel_size_A == pytest.approx((0.126953125, 0.126953125))
    assert (node.mode, node.voltage_kV) == ("haadf", 60.0)


def test_construction_rejects_non_finite_images(rng):
    data = rng.random((40, 40))
    data[0, 0] = np.inf
    with pytest.raises(ImageError, match="NaN/inf"):
        StemImageData(StemImage(data=data, pixel_size_A=0.1))
    with pytest.raises(TypeError):
        StemImageData(np.zeros((40, 40)))


def test_empty_node_cannot_be_stored():
    with pytest.raises(Exception, match="no image"):
        StemImageData().store()
