"""Regenerate the bad-input corpus in this folder, byte for byte (``python tests/data/bad/make_bad_inputs.py``).

Every file is made here from code, a fixed seed or the package's own bundled example, so the corpus has no
licence of its own beyond the package's and can be rebuilt after a format change. The DM3 file is written by
the small writer below rather than cut from the real TEMUL example (GPL-3.0, which this MIT package does not
redistribute); ``dm3_bytes`` is also used by the tests to show that the *untruncated* file reads, so the
truncated one fails because it is truncated, not because the writer is wrong. See README.md for the table.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[2] / "aiida_automat" / "resources" / "example" / "mos2_haadf.npy"

#: the example's true calibration (its sidecar: 3.072 nm over 256 px)
EXAMPLE_PIXEL_NM = 3.072 / 256
CROP = 128
HUGE = 16384


# ------------------------------------------------------------------------------------------------ DM3


def _tag_name(name: str) -> bytes:
    raw = name.encode("latin-1")
    return struct.pack(">H", len(raw)) + raw


def _data_tag(name: str, info: list[int], payload: bytes) -> bytes:
    head = b"\x15" + _tag_name(name) + b"%%%%" + struct.pack(">l", len(info)) + struct.pack(f">{len(info)}l", *info)
    return head + payload


def _simple(name: str, value) -> bytes:
    if isinstance(value, float):
        return _data_tag(name, [7], struct.pack("<d", value))  # 7 = double
    return _data_tag(name, [3], struct.pack("<l", int(value)))  # 3 = int32


def _text(name: str, text: str) -> bytes:
    """DM stores strings as arrays of uint16 (type 4 inside array type 20)."""
    return _data_tag(name, [20, 4, len(text)], struct.pack(f"<{len(text)}H", *map(ord, text)))


def _group(name: str, tags: list[bytes]) -> bytes:
    return b"\x14" + _tag_name(name) + b"\x00\x00" + struct.pack(">l", len(tags)) + b"".join(tags)


_PAYLOAD = b"\x00<pixel data>\x00"


def _dm3_parts(shape: tuple[int, int], pixel_nm: float, voltage_V: float, detector: str) -> tuple[bytes, bytes]:
    """The bytes of a float32 DM3 file before and after its pixel data (whose length the header states)."""
    ny, nx = shape
    axis = [_simple("Origin", 0.0), _simple("Scale", float(pixel_nm)), _text("Units", "nm")]
    image_data = _group("ImageData", [
        _group("Calibrations", [
            _group("Brightness", [_simple("Origin", 0.0), _simple("Scale", 1.0), _text("Units", "")]),
            _group("Dimension", [_group("", axis), _group("", axis)]),
        ]),
        _data_tag("Data", [20, 6, nx * ny], _PAYLOAD),  # 6 = float32
        _simple("DataType", 2),  # DM image type 2 = float32
        _group("Dimensions", [_simple("", nx), _simple("", ny)]),  # DM lists x first
        _simple("PixelDepth", 4),
    ])
    image_tags = _group("ImageTags", [
        _group("Microscope Info", [_simple("Voltage", float(voltage_V)), _text("Operation Mode", "SCANNING")]),
        _group("DigiScan", [_text("Detector", detector)]),
    ])
    root = _group("ImageList", [_group("", [image_data, image_tags, _text("Name", f"{detector} crafted")])])
    body = b"\x00\x00" + struct.pack(">l", 1) + root + b"\x00" * 8  # root group: not sorted, closed, 1 tag
    before, after = body.split(_PAYLOAD)
    size = 4 + len(before) + 4 * nx * ny + len(after)
    return struct.pack(">lll", 3, size, 1) + before, after  # version 3, size, little-endian data


def dm3_bytes(image: np.ndarray, pixel_nm: float, *, voltage_V: float = 60000.0, detector: str = "HAADF") -> bytes:
    """A minimal but complete DigitalMicrograph 3 file (float32 image, nm calibration, voltage, detector).

    Layout after Gatan's format as read by RosettaSciIO: big-endian header (version 3, size, byte order 1 =
    little-endian data), then the root tag group with one ``ImageList`` entry.
    """
    data = np.ascontiguousarray(image, dtype="<f4")
    before, after = _dm3_parts(data.shape, pixel_nm, voltage_V, detector)
    return before + data.tobytes() + after


def write_sparse_dm3(path: Path, shape: tuple[int, int], pixel_nm: float = 0.01) -> None:
    """A complete DM3 file of ``shape`` whose pixel data is a hole: 16384² float32 costs 1 GiB of *apparent*
    size and no disk blocks, so tests can meet a full-size file without storing or allocating one."""
    before, after = _dm3_parts(shape, pixel_nm, 60000.0, "HAADF")
    with open(path, "wb") as handle:
        handle.write(before)
        handle.seek(4 * shape[0] * shape[1], 1)
        handle.write(after)


# ------------------------------------------------------------------------------------------------ PNG


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width``×``height`` 8-bit grey, with no pixel data at all."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def npy_header_only(shape: tuple[int, ...], dtype="<f4") -> bytes:
    """An .npy header claiming ``shape`` followed by no data (what a copy cut short after 128 bytes looks like)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ images


def hexagonal_pattern(shape=(64, 64), period_px: float = 9.0) -> np.ndarray:
    """Three cosines at 120°: a clean periodic test image without any randomness."""
    y, x = np.mgrid[: shape[0], : shape[1]].astype(float)
    k = 2 * np.pi / period_px
    out = np.zeros(shape)
    for angle in (0.0, 2 * np.pi / 3, 4 * np.pi / 3):
        out += np.cos(k * (x * np.cos(angle) + y * np.sin(angle)))
    return (out + 3.0).astype(np.float32)


def amorphous_carbon(shape=(128, 128), pixel_A: float = 0.1, seed: int = 1) -> np.ndarray:
    """A fast-model HAADF image of randomly placed carbon atoms (min. distance 1.3 Å, ~0.35 atoms/Å²).

    The random layout sits in one cell larger than the field of view, so the image has no period inside it.
    """
    from ase import Atoms

    from aiida_automat.imaging import Microscope
    from aiida_automat.imaging.fastsim import fast_image

    rng = np.random.default_rng(seed)
    size = 1.3 * max(shape) * pixel_A
    points: list[np.ndarray] = []
    target = int(0.35 * size * size)
    for _ in range(40 * target):
        p = rng.random(2) * size
        if all(np.linalg.norm(p - q) >= 1.3 for q in points):
            points.append(p)
        if len(points) >= target:
            break
    positions = [(x, y, 10.0 + rng.normal(0, 0.5)) for x, y in points]
    atoms = Atoms(f"C{len(points)}", positions=positions, cell=[size, size, 20.0], pbc=(True, True, False))
    img = fast_image(atoms, Microscope(mode="haadf", voltage_kV=60, semiangle_mrad=30), pixel_size_A=pixel_A,
                     shape=shape, dose_e_per_A2=1e6, rng=rng)
    return img.data.astype(np.float16)


def bulk_si110(shape=(128, 128), pixel_A: float = 0.15, layers: int = 24, seed: int = 2) -> np.ndarray:
    """A fast-model HAADF image of a thick Si slab seen along [110] (dumbbells, 3.84 × 5.43 Å cell).

    A bulk crystal in a zone axis: a perfectly periodic image whose lattice is no monolayer's.
    """
    from ase.build import bulk, surface

    from aiida_automat.imaging import Microscope
    from aiida_automat.imaging.fastsim import fast_image

    slab = surface(bulk("Si", "diamond", a=5.431, cubic=True), (1, 1, 0), layers=layers, vacuum=10.0)
    slab.pbc = (True, True, False)
    img = fast_image(slab, Microscope(mode="haadf", voltage_kV=60, semiangle_mrad=30), pixel_size_A=pixel_A,
                     shape=shape, rotation_deg=11.0, dose_e_per_A2=5e4, rng=np.random.default_rng(seed))
    return img.data.astype(np.float16)


def mos2_crop() -> np.ndarray:
    """The top-left 128×128 px of the bundled MoS2 example (0.12 Å/px, 15.4 Å field of view)."""
    return np.load(EXAMPLE)[:CROP, :CROP].astype(np.float16)


def sidecar(fov_nm: float) -> bytes:
    return json.dumps({"experiment_type": "HAADF-STEM", "voltage": "60 kV", "convergence_semiangle": "30 mrad",
                       "field_of_view_x": fov_nm, "field_of_view_y": fov_nm, "field_of_view_units": "nm"},
                      indent=1).encode() + b"\n"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _png(array8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array8).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ corpus


def corpus() -> dict[str, bytes]:
    """File name → content of every file in the corpus."""
    pattern = hexagonal_pattern()
    full_dm3 = dm3_bytes(pattern, pixel_nm=0.012)
    smooth = hexagonal_pattern()
    nan = smooth.copy()
    nan[[3, 17, 30, 41, 60], [5, 22, 33, 8, 59]] = np.nan
    grey8 = (255 * (pattern - pattern.min()) / np.ptp(pattern)).astype(np.uint8)
    crop = mos2_crop()
    fov = CROP * EXAMPLE_PIXEL_NM
    files = {
        "truncated.dm3": full_dm3[: len(full_dm3) * 6 // 10],
        "empty.dm3": b"",
        "png_named.dm3": _png(grey8),
        "text_named.tif": b"pixel size 0.1 A, HAADF, 60 kV\nthis is a text file, not a TIFF\n",
        "all_zero.npy": _npy(np.zeros((64, 64), dtype=np.float32)),
        "nan_pixels.npy": _npy(nan),
        "tiny_8x8.npy": _npy(smooth[:8, :8]),
        "huge_header_16k.npy": npy_header_only((HUGE, HUGE)),
        "huge_header_16k.png": png_header_only(HUGE, HUGE),
        "amorphous_carbon.npy": _npy(amorphous_carbon()),
        "bulk_si110.npy": _npy(bulk_si110()),
        "mos2_no_calibration.npy": _npy(crop),
        "mos2_pixel_x2.npy": _npy(crop),
        "mos2_pixel_x2.json": sidecar(2 * fov),
    }
    for name in ("all_zero", "nan_pixels", "tiny_8x8"):
        files[f"{name}.json"] = sidecar(0.64 * (8 / 64 if name == "tiny_8x8" else 1.0))
    files["amorphous_carbon.json"] = sidecar(128 * 0.01)
    files["bulk_si110.json"] = sidecar(128 * 0.015)
    return files


def main(folder: Path = HERE) -> None:
    for name, content in sorted(corpus().items()):
        (folder / name).write_bytes(content)
        print(f"{name:28s} {len(content):>7d} B")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
