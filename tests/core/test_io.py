"""Reading images into calibrated ``StemImage``s, and the native npz round trip."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from aiida_automat.errors import CalibrationError, ImageError
from aiida_automat.imaging.image import StemImage
from aiida_automat.imaging.io import (
    CalibrationMismatchWarning,
    align_and_sum,
    load_stem_image,
    read_image,
    save_stem_image,
)
from aiida_automat.imaging.microscope import Microscope

DM3 = "real/mos2_temul/example_Se_implanted_MoS2.dm3"
SCILINK = "real/mos2_scilink/MoS2_stem_Exp-000-2"


def smooth_image(rng, shape=(64, 64)) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.random(shape), 2.0) + 1.0


def _axes(shape, scale, units):
    return [
        {"name": "y", "size": shape[0], "scale": scale[0], "offset": 0.0, "units": units, "navigate": False},
        {"name": "x", "size": shape[1], "scale": scale[1], "offset": 0.0, "units": units, "navigate": False},
    ]


# ------------------------------------------------------------------------------------------ real data


def test_dm3_calibration_and_optics_from_file(shared_data):
    path = shared_data / DM3
    image = read_image(path)
    assert image.shape == (1024, 1024)
    assert image.pixel_size_A == pytest.approx((0.126953125, 0.126953125), rel=1e-12)
    assert image.microscope.mode == "haadf"
    assert image.microscope.voltage_kV == pytest.approx(60.0)
    assert image.source == path.name
    assert image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    md = image.metadata
    assert (md["calibration_source"], md["mode_source"], md["voltage_source"]) == ("file", "file", "file")
    assert md["semiangle_source"] == "default"
    assert image.data.dtype == np.float32 and np.all(np.isfinite(image.data))


def test_dm3_user_pixel_size_overrides_and_records_disagreement(shared_data):
    with pytest.warns(CalibrationMismatchWarning, match="differs"):
        image = read_image(shared_data / DM3, pixel_size_A=0.134, semiangle_mrad=30.0)
    assert image.pixel_size_A == (0.134, 0.134)
    assert image.metadata["calibration_source"] == "user"
    assert image.metadata["pixel_size_file_A"] == pytest.approx([0.126953125] * 2)
    assert image.metadata["calibration_mismatch"]["relative"] == pytest.approx(0.134 / 0.126953125 - 1)
    assert image.microscope.semiangle_mrad == 30.0 and image.metadata["semiangle_source"] == "user"


def test_dm3_close_user_pixel_size_does_not_warn(shared_data, recwarn):
    image = read_image(shared_data / DM3, pixel_size_A=0.127)
    assert image.metadata["calibration_source"] == "user"
    assert "calibration_mismatch" not in image.metadata
    assert not [w for w in recwarn if issubclass(w.category, CalibrationMismatchWarning)]


def test_npy_with_json_sidecar(shared_data):
    image = read_image(shared_data / f"{SCILINK}.npy")
    assert image.shape == (512, 512)
    assert image.pixel_size_A == pytest.approx((90.0 / 512, 90.0 / 512))
    assert image.microscope.mode == "haadf" and image.microscope.voltage_kV == 60.0
    assert image.metadata["calibration_source"] == "sidecar"
    assert image.metadata["voltage_source"] == "sidecar"


def test_truncated_dm3_is_an_image_error(shared_data, tmp_path):
    truncated = tmp_path / "truncated.dm3"
    truncated.write_bytes((shared_data / DM3).read_bytes()[:1000])
    with pytest.raises(ImageError, match="truncated") as info:
        read_image(truncated, pixel_size_A=0.1)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ plain arrays


def test_npy_needs_a_calibration(tmp_path, rng):
    path = tmp_path / "image.npy"
    np.save(path, smooth_image(rng))
    with pytest.raises(CalibrationError, match="pixel_size_A") as info:
        read_image(path)
    assert "\n" not in str(info.value)
    image = read_image(path, pixel_size_A=0.2, mode="abf", voltage_kV=80)
    assert image.pixel_size_A == (0.2, 0.2)
    assert image.microscope.mode == "abf" and image.microscope.voltage_kV == 80
    assert image.metadata["calibration_source"] == "user" and image.metadata["mode_source"] == "user"


def test_npy_sidecar_per_axis_and_units(tmp_path, rng):
    path = tmp_path / "image.npy"
    np.save(path, smooth_image(rng, (64, 128)))
    sidecar = {"experiment_type": "ABF-STEM", "voltage": "300 kV", "convergence_angle": "21.4 mrad",
               "spatial_info": {"field_of_view_x": 2560, "field_of_view_y": 640, "field_of_view_units": "pm"}}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    image = read_image(path)
    assert image.pixel_size_A == pytest.approx((0.1, 0.2))
    assert (image.microscope.mode, image.microscope.voltage_kV, image.microscope.semiangle_mrad) == ("abf", 300.0, 21.4)


def test_sidecar_without_units_is_a_calibration_error(tmp_path, rng):
    path = tmp_path / "image.npy"
    np.save(path, smooth_image(rng))
    path.with_suffix(".json").write_text(json.dumps({"field_of_view_x": 9.0}))
    with pytest.raises(CalibrationError, match="unit"):
        read_image(path)


def test_npz_png_tif_with_and_without_pixel_size(tmp_path, rng):
    import tifffile
    from PIL import Image

    data = smooth_image(rng)
    np.savez(tmp_path / "a.npz", image=data)
    grey8 = (255 * (data - data.min()) / np.ptp(data)).astype(np.uint8)
    Image.fromarray(grey8).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", data.astype(np.float32))
    for name in ("a.npz", "a.png", "a.tif"):
        with pytest.raises(CalibrationError):
            read_image(tmp_path / name)
        image = read_image(tmp_path / name, pixel_size_A=(0.11, 0.12))
        assert image.shape == (64, 64) and image.pixel_size_A == (0.11, 0.12), name
    np.testing.assert_allclose(read_image(tmp_path / "a.npz", pixel_size_A=0.1).data, data.astype(np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", pixel_size_A=0.1).data, grey8)


def test_colour_png_becomes_grey(tmp_path, rng):
    from PIL import Image

    grey8 = (255 * rng.random((48, 40))).astype(np.uint8)
    Image.fromarray(np.stack([grey8] * 3, axis=-1)).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png", pixel_size_A=0.1)
    assert image.shape == (48, 40)
    np.testing.assert_allclose(image.data, grey8, atol=0.51)

    np.save(tmp_path / "rgb.npy", np.stack([grey8] * 3, axis=-1))
    image = read_image(tmp_path / "rgb.npy", pixel_size_A=0.1)
    assert image.shape == (48, 40) and image.metadata["converted_from_colour"] is True
    np.testing.assert_allclose(image.data, grey8, atol=1e-3)


# ------------------------------------------------------------------------------------------ rsciio formats


def test_calibrated_tiff_nm_per_axis(tmp_path, rng):
    from rsciio import tiff

    data = smooth_image(rng, (64, 80)).astype(np.float32)
    signal = {"data": data, "axes": _axes(data.shape, (0.02, 0.025), "nm"), "metadata": {}, "original_metadata": {}}
    tiff.file_writer(str(tmp_path / "cal.tif"), signal)
    image = read_image(tmp_path / "cal.tif")
    assert image.pixel_size_A == pytest.approx((0.2, 0.25))
    assert image.metadata["calibration_source"] == "file" and image.metadata["reader"] == "rsciio.tiff"


def test_emd_file_calibration(tmp_path, rng):
    from rsciio import emd

    data = smooth_image(rng).astype(np.float32)
    signal = {"data": data, "axes": _axes(data.shape, (15.0, 15.0), "pm"),
              "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}}, "original_metadata": {}}
    emd.file_writer(str(tmp_path / "a.emd"), signal)
    image = read_image(tmp_path / "a.emd")
    assert image.pixel_size_A == pytest.approx((0.15, 0.15))
    assert image.microscope.mode == "haadf" and image.metadata["mode_source"] == "file"


def _shifted_stack(rng, shifts, shape=(96, 96), noise=0.005):
    """Frames cut from one larger scene at sub-pixel offsets: edges are not periodic, as in a real scan."""
    from scipy.ndimage import fourier_shift

    margin = 32
    scene = smooth_image(rng, (shape[0] + 2 * margin, shape[1] + 2 * margin))
    frames = [
        np.fft.ifftn(fourier_shift(np.fft.fftn(scene), s)).real[margin:-margin, margin:-margin] for s in shifts
    ]
    return frames[0], np.stack(frames) + noise * rng.standard_normal((len(shifts), *shape))


def test_hspy_stack_is_aligned_and_summed_with_file_optics(tmp_path, rng):
    from rsciio import hspy

    shifts = [(0.0, 0.0), (3.0, -2.0), (-4.5, 5.25)]
    base, stack = _shifted_stack(rng, shifts)
    axes = [{"name": "frame", "size": 3, "scale": 1.0, "offset": 0.0, "units": None, "navigate": True},
            *_axes(base.shape, (0.01, 0.01), "nm")]
    md = {"General": {"title": "stack"}, "Signal": {"signal_type": ""},
          "Acquisition_instrument": {"TEM": {"beam_energy": 200.0, "convergence_angle": 21.0,
                                             "Detector": {"detector_type": "HAADF"}}}}
    signal = {"data": stack.astype(np.float32), "axes": axes, "metadata": md, "original_metadata": {},
              "tmp_parameters": {}, "attributes": {"_lazy": False}, "learning_results": {}, "models": {},
              "package_info": {"name": "hyperspy", "version": "2.0"}}
    hspy.file_writer(str(tmp_path / "stack.hspy"), signal)

    image = read_image(tmp_path / "stack.hspy")
    assert image.pixel_size_A == pytest.approx((0.1, 0.1))
    assert (image.microscope.voltage_kV, image.microscope.semiangle_mrad, image.microscope.mode) == (200.0, 21.0, "haadf")
    assert image.metadata["n_frames"] == 3 and image.metadata["frames"] == "aligned_sum"
    np.testing.assert_allclose(image.metadata["frame_shifts_px"], -np.array(shifts), atol=0.15)
    top, bottom, left, right = image.metadata["crop_px"]
    assert image.shape == (96 - top - bottom, 96 - left - right)
    # the aligned sum is three times the first frame, up to noise
    expected = 3 * base[top: 96 - bottom, left: 96 - right]
    assert np.corrcoef(image.data.ravel(), expected.ravel())[0, 1] > 0.99

    single = read_image(tmp_path / "stack.hspy", frame=2)
    assert single.shape == (96, 96) and single.metadata["frames"] == 2
    with pytest.raises(ImageError, match="out of range"):
        read_image(tmp_path / "stack.hspy", frame=3)


def test_align_and_sum_beats_naive_sum(rng):
    shifts = [(0.0, 0.0), (2.0, 1.0), (-1.0, 3.0), (4.0, -3.0)]
    base, stack = _shifted_stack(rng, shifts)
    summed, measured, (top, bottom, left, right) = align_and_sum(stack)
    np.testing.assert_allclose(measured, -np.array(shifts), atol=0.15)
    reference = base[top: 96 - bottom, left: 96 - right]
    naive = stack.sum(axis=0)[top: 96 - bottom, left: 96 - right]
    aligned_r = np.corrcoef(summed.ravel(), reference.ravel())[0, 1]
    naive_r = np.corrcoef(naive.ravel(), reference.ravel())[0, 1]
    assert aligned_r > 0.99 > naive_r


def test_generic_hdf5_dataset(tmp_path, rng):
    import h5py

    with h5py.File(tmp_path / "scan.h5", "w") as handle:
        handle.create_dataset("entry/haadf", data=smooth_image(rng))
    image = read_image(tmp_path / "scan.h5", pixel_size_A=0.1)
    assert image.shape == (64, 64)


# ------------------------------------------------------------------------------------------ bad files


def test_empty_file(tmp_path):
    (tmp_path / "empty.dm3").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_image(tmp_path / "empty.dm3")


def test_wrong_extension_and_wrong_content(tmp_path, rng):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt", pixel_size_A=0.1)
    np.save(tmp_path / "array.npy", smooth_image(rng))
    (tmp_path / "array.dm3").write_bytes((tmp_path / "array.npy").read_bytes())
    with pytest.raises(ImageError, match="Gatan") as info:
        read_image(tmp_path / "array.dm3", pixel_size_A=0.1)
    assert "\n" not in str(info.value)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ImageError, match="NumPy"):
        read_image(tmp_path / "junk.npy", pixel_size_A=0.1)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "nope.dm3")


def test_nan_image_fails_validation(tmp_path, rng):
    data = smooth_image(rng)
    data[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(ImageError, match="NaN"):
        read_image(tmp_path / "nan.npy", pixel_size_A=0.1)


def test_unknown_microscope_override_is_rejected(tmp_path, rng):
    from aiida_automat.errors import AutomatError

    np.save(tmp_path / "a.npy", smooth_image(rng))
    with pytest.raises(AutomatError, match="unknown microscope parameter"):
        read_image(tmp_path / "a.npy", pixel_size_A=0.1, focus=3)
    image = read_image(tmp_path / "a.npy", pixel_size_A=0.1, defocus_A=20.0, source_size_A=0.5)
    assert (image.microscope.defocus_A, image.microscope.source_size_A) == (20.0, 0.5)


# ------------------------------------------------------------------------------------------ native format


def test_save_load_round_trip_is_exact(tmp_path, rng):
    image = StemImage(
        data=rng.standard_normal((40, 50)),
        pixel_size_A=(0.1234567890123, 0.2),
        microscope=Microscope(mode="idpc", voltage_kV=80.0, semiangle_mrad=31.5, defocus_A=-12.5, source_size_A=0.4),
        dose_e_per_A2=1.5e4,
        source="x.dm4",
        sha256="ab" * 32,
        metadata={"calibration_source": "user", "frame_shifts_px": [[0.0, 0.5]], "note": "µ", "n": 3, "flag": None},
    )
    save_stem_image(tmp_path / "img.npz", image)
    back = load_stem_image(tmp_path / "img.npz")
    assert back.data.tobytes() == image.data.tobytes() and back.data.dtype == np.float32
    for field in ("pixel_size_A", "microscope", "dose_e_per_A2", "source", "sha256"):
        assert getattr(back, field) == getattr(image, field), field
    assert dict(back.metadata) == dict(image.metadata)
    # read_image recognises the native format and keeps it unchanged
    again = read_image(tmp_path / "img.npz")
    assert again.sha256 == image.sha256 and again.pixel_size_A == image.pixel_size_A
    assert again.data.tobytes() == image.data.tobytes()


def test_load_rejects_foreign_npz(tmp_path):
    np.savez(tmp_path / "other.npz", image=np.zeros((4, 4)))
    with pytest.raises(ImageError, match="not an aiida-automat stored image"):
        load_stem_image(tmp_path / "other.npz")
