"""Reading microscope files into a calibrated ``StemImage`` and passing it between processes.

Every format goes through one path: a *reader* returns raw arrays plus whatever calibration and optics
the file knows; ``read_image`` then decides, in one visible order, where each number comes from
(user > file > JSON sidecar > default) and records that decision in ``metadata`` so that a wrong pixel
size can be traced back to its origin rather than rediscovered from a bad FFT.

Vendor formats are read with RosettaSciIO (the HyperSpy readers), which knows the binary layouts far
better than we could; plain arrays (.npy/.npz/.png/uncalibrated .tif) carry no calibration, so they need
an explicit pixel size or a JSON sidecar (same stem, ``.json``). Reader failures are wrapped into a
one-line ``ImageError``: a truncated file must not surface as a ``struct.error`` from deep inside a parser.
The size of the array is read from the header first (NumPy and image headers; RosettaSciIO formats opened
lazily) and refused above ``MAX_PIXELS`` values, so a 16k × 16k scan cannot exhaust memory before it fails.

Multi-frame stacks are, by default, rigidly aligned by cross-correlation and summed (summing keeps counts,
hence dose, meaningful); the margins that not every frame covers are cropped so no wrapped or
extrapolated pixels enter the sum. ``frame=<int>`` picks one frame instead.

``save_stem_image``/``load_stem_image`` are the native lossless format (.npz: the float32 array plus one
JSON string with every other field) used to hand images between ``automat-exec`` and the AiiDA layer.
"""

from __future__ import annotations

import io as _io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..hashing import file_sha256
from ..errors import AutomatError, CalibrationError, ImageError
from .image import StemImage, check_pixels
from .microscope import MODES, Microscope

__all__ = [
    "read_image",
    "save_stem_image",
    "load_stem_image",
    "align_and_sum",
    "stem_image_to_record",
    "stem_image_from_record",
    "json_safe",
    "file_sha256",
    "SUPPORTED_EXTENSIONS",
    "CalibrationMismatchWarning",
    "MAX_PIXELS",
]

#: extension → (reader key, human description). The reader key selects the branch in ``_read_raw``.
SUPPORTED_EXTENSIONS = {
    ".dm3": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".dm4": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".emd": ("emd", "EMD (Velox / NCEM)"),
    ".ser": ("tia", "FEI TIA"),
    ".tif": ("tiff", "TIFF"),
    ".tiff": ("tiff", "TIFF"),
    ".hspy": ("hspy", "HyperSpy HDF5"),
    ".h5": ("hspy", "HDF5"),
    ".hdf5": ("hspy", "HDF5"),
    ".npy": ("numpy", "NumPy array"),
    ".npz": ("numpy", "NumPy archive"),
    ".png": ("image", "PNG image"),
    ".jpg": ("image", "JPEG image"),
    ".jpeg": ("image", "JPEG image"),
    ".bmp": ("image", "BMP image"),
}

#: length unit → Å. Anything else (pixels, inches, reciprocal units) is not a real-space calibration.
_LENGTH_TO_A = {
    "a": 1.0, "å": 1.0, "Å": 1.0, "angstrom": 1.0, "angstroms": 1.0, "ang": 1.0,
    "nm": 10.0, "nanometer": 10.0, "nanometers": 10.0, "nanometre": 10.0,
    "pm": 0.01, "picometer": 0.01, "picometers": 0.01,
    "µm": 1e4, "μm": 1e4, "um": 1e4, "micron": 1e4, "microns": 1e4, "micrometer": 1e4,
    "mm": 1e7, "m": 1e10,
}

NATIVE_FORMAT = "aiida-automat.stem_image"
NATIVE_VERSION = 1
_MISMATCH_TOLERANCE = 0.01

#: Default ceiling on the values ``read_image`` loads from one file (all frames and colour channels):
#: 8192×8192 ≈ 67 M, about 0.8 GB while the float64 working copy and the float32 image coexist.
MAX_PIXELS = 8192 * 8192

_HOW_TO_CALIBRATE = (
    "give pixel_size_A=... (Å/px; CLI --pixel-size) or put a JSON sidecar with field_of_view_x/y and units "
    "next to the file"
)


class CalibrationMismatchWarning(UserWarning):
    """A user-given pixel size disagrees with the file's calibration by more than 1 %."""


# --------------------------------------------------------------------------------------------- helpers


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that survives JSON and AiiDA attributes unchanged.

    Vendor metadata holds numpy scalars, tuples, bytes and trait ``Undefined`` objects; normalising them
    here, once, lets the npz format and ``StemImageData`` promise an exact round trip.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist()) if value.size <= 64 else f"<array shape={list(value.shape)} dtype={value.dtype}>"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf8", errors="replace")
    text = str(value)
    return None if text in ("<undefined>", "Undefined") else text




def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _length_factor(units) -> float | None:
    """Å per unit, or None when ``units`` is not a real-space length (pixels, undefined, 1/nm)."""
    if units is None:
        return None
    text = str(units).strip()
    if not text or text.startswith("<") or "/" in text or "^-1" in text:
        return None
    return _LENGTH_TO_A.get(text) or _LENGTH_TO_A.get(text.lower())


_QUANTITY = re.compile(r"^\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*([A-Za-zµμÅ]*)\s*$")


def _parse_quantity(value, unit_scale: Mapping[str, float], default_unit: str | None) -> float | None:
    """``60``, ``"60 kV"``, ``"60000 V"`` → a number in the target unit (the one scaling by 1)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float, np.number)):
        number, unit = float(value), default_unit
    else:
        match = _QUANTITY.match(str(value))
        if not match:
            return None
        number, unit = float(match.group(1)), (match.group(2) or default_unit)
    if unit is None or not math.isfinite(number):
        return None
    scale = unit_scale.get(unit) or unit_scale.get(unit.lower())
    return None if scale is None else number * scale


_VOLTAGE_UNITS = {"kV": 1.0, "kv": 1.0, "V": 1e-3, "v": 1e-3, "MV": 1e3, "mv": 1e3}
_ANGLE_UNITS = {"mrad": 1.0, "rad": 1e3, "urad": 1e-3, "µrad": 1e-3}


def _bare_number(value):
    """Vendor tags often store numbers as strings (Velox: ``"300000"``); treat those as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _voltage_kV(value) -> float | None:
    """Voltages come as kV, V (DM's ``Voltage = 60000``) or strings; bare numbers ≥ 1000 are volts."""
    value = _bare_number(value)
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        number = float(value)
        kv = number / 1e3 if number >= 1000.0 else number
    else:
        kv = _parse_quantity(value, _VOLTAGE_UNITS, "kV")
    return kv if kv is not None and 1.0 <= kv <= 2000.0 else None


def _semiangle_mrad(value) -> float | None:
    """Bare numbers below 1 are radians (Velox stores ``BeamConvergence`` in rad)."""
    value = _bare_number(value)
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        number = float(value)
        mrad = number * 1e3 if 0 < number < 1.0 else number
    else:
        mrad = _parse_quantity(value, _ANGLE_UNITS, "mrad")
    return mrad if mrad is not None and 1.0 <= mrad <= 200.0 else None


# Order matters: the longer name must win (HAADF before ADF, iDPC before DPC, ABF before BF).
_MODE_PATTERNS = (
    ("haadf", re.compile(r"haadf", re.I)),
    ("idpc", re.compile(r"idpc", re.I)),
    ("dpc", re.compile(r"(?<![a-z])dpc", re.I)),
    ("abf", re.compile(r"(?<![a-z])abf(?![a-z])", re.I)),
    ("adf", re.compile(r"(?<![a-z])(?:l|m)?adf(?![a-z])|(?<![a-z])df\d?(?![a-z])|dark[ -]?field|annular", re.I)),
    ("bf", re.compile(r"(?<![a-z])bf(?![a-z])|bright[ -]?field", re.I)),
)


def _mode_from_text(text) -> str | None:
    if not isinstance(text, str):
        return None
    for mode, pattern in _MODE_PATTERNS:
        if pattern.search(text):
            return mode
    return None


def _flatten(tree, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def _get_path(tree, path: str):
    node = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set_path(tree: dict, path: str, value) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[parts[-1]] = value


def _apply_mapping(original: Mapping, mapping: Mapping | None) -> dict:
    """Do what HyperSpy does with a RosettaSciIO ``mapping``: copy vendor tags to standard names.

    rsciio leaves this step to the caller; without it the DM voltage stays buried in
    ``ImageList.TagGroup0.ImageTags.Microscope Info.Voltage``.
    """
    mapped: dict = {}
    for source, target in (mapping or {}).items():
        value = _get_path(original, source)
        if value is None:
            continue
        try:
            key, func = target
            _set_path(mapped, key, func(value) if func is not None else value)
        except Exception:  # noqa: BLE001 - one odd vendor tag must not sink the whole read
            continue
    return mapped


def _merge(base: Mapping, extra: Mapping) -> dict:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------- optics


_VOLTAGE_KEYS = re.compile(r"^(voltage|accelerationvoltage|accelerating[ _]?voltage|high[ _]?tension(_kv)?|ht|beam_energy)$", re.I)
_ANGLE_KEYS = re.compile(r"^(convergence[ _]?angle|beamconvergence|convergence[ _]semi[ -]?angle|semi[ _-]?angle(_mrad)?|semiangle_mrad|alpha_mrad)$", re.I)
_DETECTOR_KEYS = re.compile(r"^(detector|detectorname|detector[ _]name|detector_type|signal[ _]name|experiment_type|imaging_mode|mode)$", re.I)


def _optics_from_tree(tree: Mapping) -> dict:
    """Voltage, semiangle and mode found anywhere in a metadata tree, by conventional key names.

    A key-name search (rather than fixed vendor paths) covers DM3/DM4 tag groups, Velox, TIA and ad hoc
    JSON sidecars alike; values outside physical ranges are ignored (DM writes ``Voltage = 0`` when the
    microscope was not connected).
    """
    found: dict = {}
    for path, value in _flatten(tree):
        key = path.rsplit(".", 1)[-1]
        if "voltage_kV" not in found and _VOLTAGE_KEYS.match(key):
            kv = _voltage_kV(value)
            if kv is not None:
                found["voltage_kV"] = kv
        elif "semiangle_mrad" not in found and _ANGLE_KEYS.match(key):
            mrad = _semiangle_mrad(value)
            if mrad is not None:
                found["semiangle_mrad"] = mrad
        elif "mode" not in found and _DETECTOR_KEYS.match(key):
            mode = _mode_from_text(value)
            if mode is not None:
                found["mode"] = mode
    return found


def _file_optics(signal: dict) -> dict:
    """Optics stated by a RosettaSciIO signal: standard metadata first, then vendor tags."""
    mapped = _merge(signal.get("metadata") or {}, _apply_mapping(signal.get("original_metadata") or {}, signal.get("mapping")))
    found: dict = {}
    tem = _get_path(mapped, "Acquisition_instrument.TEM") or {}
    kv = _voltage_kV(tem.get("beam_energy")) if isinstance(tem, Mapping) else None
    if kv is not None:
        found["voltage_kV"] = kv
    mrad = _semiangle_mrad(tem.get("convergence_angle")) if isinstance(tem, Mapping) else None
    if mrad is not None:
        found["semiangle_mrad"] = mrad
    for text in (_get_path(mapped, "Acquisition_instrument.TEM.Detector.detector_type"),
                 _get_path(mapped, "General.title")):
        mode = _mode_from_text(text)
        if mode is not None:
            found["mode"] = mode
            break
    for key, value in _optics_from_tree(signal.get("original_metadata") or {}).items():
        found.setdefault(key, value)
    found["_mapped"] = mapped
    return found


# --------------------------------------------------------------------------------------------- sidecar


def _sidecar_path(path: Path) -> Path | None:
    candidate = path.with_suffix(".json")
    return candidate if candidate != path and candidate.is_file() else None


def _read_sidecar(path: Path) -> dict:
    try:
        tree = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError) as exc:
        raise ImageError(f"sidecar {path.name} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(tree, Mapping):
        raise ImageError(f"sidecar {path.name} must hold a JSON object")
    return dict(tree)


def _sidecar_calibration(tree: Mapping, shape: tuple[int, int], name: str) -> tuple[float, float] | None:
    """Pixel size (y, x) in Å from a sidecar's field of view (or pixel size) and its units.

    Units are required: guessing nm vs Å would silently put a factor of 10 into every lattice constant.
    A field of view given for one axis only (or without axis) is the width, and pixels are taken square.
    """
    flat = {path.rsplit(".", 1)[-1].lower(): value for path, value in _flatten(tree)}
    units = flat.get("field_of_view_units") or flat.get("pixel_size_units") or flat.get("units")
    for kind in ("field_of_view", "pixel_size"):
        values = {}
        for axis in ("y", "x"):
            for key, unit in ((f"{kind}_{axis}", units), (f"{kind}_{axis}_nm", "nm"), (f"{kind}_{axis}_a", "Å")):
                if flat.get(key) is not None:
                    values[axis] = (key, flat[key], unit)
                    break
        if not values:
            for key, unit in ((kind, units), (f"{kind}_nm", "nm"), (f"{kind}_a", "Å")):
                if flat.get(key) is not None:
                    values["x"] = (key, flat[key], unit)
                    break
        if not values:
            continue
        pixel = {}
        for axis, (key, value, unit) in values.items():
            factor = _length_factor(unit)
            if factor is None:
                raise CalibrationError(f"sidecar {name} gives {key} without a length unit ({unit!r}); add e.g. \"{kind}_units\": \"nm\"")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise CalibrationError(f"sidecar {name}: {key} = {value!r} is not a number") from None
            n = shape[0] if axis == "y" else shape[1]
            pixel[axis] = number * factor / n if kind == "field_of_view" else number * factor
        return (pixel.get("y", pixel.get("x")), pixel.get("x", pixel.get("y")))
    return None


# --------------------------------------------------------------------------------------------- readers


#: Velox files may hold an EDS spectrum image next to the STEM images: loading it is slow, needs the
#: optional ``sparse`` package and is never the image we want.
_READER_OPTIONS = {"emd": {"select_type": "image"}}


def _rsciio_reader(key: str):
    import importlib

    return importlib.import_module(f"rsciio.{key}").file_reader


def _too_large(path: Path) -> ImageError:
    return ImageError(f"{path.name} is too large to load into memory")


def _unreadable(path: Path, description: str, exc: BaseException) -> ImageError:
    return ImageError(f"cannot read {path.name} as {description}: it is truncated, corrupt or another format "
                      f"({_first_line(exc)})")


def _check_size(shape, name: str, max_pixels: int | None) -> None:
    """Refuse an array larger than ``max_pixels`` values from its header, before a byte of it is read."""
    if max_pixels is None:
        return
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    if count > max_pixels:
        raise ImageError(
            f"{name} holds {'×'.join(map(str, shape))} = {count:,} values, which exceeds the pixel limit of "
            f"{max_pixels:,} (max_pixels; default 8192×8192): crop or bin it first, or raise max_pixels"
        )


def _npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the .npy stream at ``handle`` (positioned at its start), reading only the header."""
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(handle)
    return shape, dtype


def _read_h5_generic(path: Path, max_pixels: int | None) -> list[dict]:
    """Fallback for HDF5 files HyperSpy did not write: the one 2D/3D numeric dataset in the file."""
    import h5py

    found = []
    with h5py.File(path, "r") as handle:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) and np.issubdtype(obj.dtype, np.number):
                found.append(name)

        handle.visititems(visit)
        if len(found) != 1:
            names = ", ".join(found) or "none"
            raise ImageError(f"{path.name}: expected one 2D/3D image dataset in the HDF5 file, found {len(found)} ({names})")
        dataset = handle[found[0]]
        _check_size(dataset.shape, path.name, max_pixels)
        data = dataset[()]
    return [{"data": data, "axes": [], "metadata": {"General": {"title": found[0]}}, "original_metadata": {}}]


def _npz_member(archive, key: str, name: str, max_pixels: int | None) -> np.ndarray:
    with archive.zip.open(f"{key}.npy") as handle:
        shape, _ = _npy_header(handle)
    _check_size(shape, name, max_pixels)
    return archive[key]


def _read_numpy(path: Path, max_pixels: int | None) -> list[dict] | StemImage:
    def signal(data):
        return [{"data": data, "axes": [], "metadata": {}, "original_metadata": {}}]

    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as handle:
                shape, _ = _npy_header(handle)
            _check_size(shape, path.name, max_pixels)
            return signal(np.load(path, allow_pickle=False))
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "record" in names and "data" in names:
                with archive.zip.open("data.npy") as handle:
                    _check_size(_npy_header(handle)[0], path.name, max_pixels)
                return _from_native(archive, path.name)
            for key in ("image", "data", "arr_0") + ((names[0],) if len(names) == 1 else ()):
                if key in names:
                    return signal(_npz_member(archive, key, path.name, max_pixels))
    except AutomatError:
        raise
    except MemoryError:
        raise _too_large(path) from None
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError/BadZipFile/zlib.error
        raise ImageError(f"{path.name} is not a readable NumPy file ({_first_line(exc)})") from None
    raise ImageError(f"{path.name} holds arrays {names}; save the image as 'image' (np.savez(path, image=array))")


class _QuietTifffile:
    """Silence tifffile's log lines about a corrupt file while we read it: the failure reaches the user once,
    as the one-line ``ImageError``, instead of as a dozen log lines before it."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("tifffile")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _probe_image_size(path: Path, max_pixels: int | None) -> None:
    """PNG/JPEG/BMP: the size from the header (PIL decodes nothing in ``open``)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            shape = (getattr(im, "n_frames", 1), im.size[1], im.size[0], len(im.getbands()))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path.name} exceeds the pixel limit ({_first_line(exc)})") from None
    except Exception:  # noqa: BLE001 - not an image: the reader says so below, in its words
        return
    _check_size(shape, path.name, max_pixels)


def _read_rsciio(path: Path, reader: str, lazy: bool) -> list[dict]:
    with _QuietTifffile():
        return list(_rsciio_reader(reader)(str(path), lazy=lazy, **_READER_OPTIONS.get(reader, {})) or [])


def _read_raw(path: Path, reader: str, description: str, max_pixels: int | None) -> list[dict] | StemImage:
    """Every file's signals, with no array larger than ``max_pixels`` read into memory.

    NumPy and image headers are read first. RosettaSciIO formats are opened lazily (memory map / dask), which
    parses only the header; the selected array is read later by ``_materialize``. A file the lazy path cannot
    open (a reader without lazy support for that content, or a corrupt file) is read eagerly, so the user
    sees that reader's own diagnosis.
    """
    if reader == "numpy":
        return _read_numpy(path, max_pixels)
    if reader == "image":
        _probe_image_size(path, max_pixels)
    else:
        try:
            signals = _read_rsciio(path, reader, lazy=True)
        except Exception:  # noqa: BLE001 - retried eagerly below
            signals = None
        if signals:
            return signals
    try:
        signals = _read_rsciio(path, reader, lazy=False)
    except ImportError as exc:
        raise ImageError(f"reading {description} files needs {exc.name or 'an optional package'}; install it") from None
    except MemoryError:
        raise _too_large(path) from None
    except Exception as exc:  # noqa: BLE001 - every reader raises its own zoo (struct.error, KeyError, ...)
        if reader == "hspy" and path.suffix.lower() in (".h5", ".hdf5"):
            try:
                return _read_h5_generic(path, max_pixels)
            except ImageError:
                raise
            except Exception:  # noqa: BLE001
                pass
        raise _unreadable(path, description, exc) from None
    if not signals:
        raise ImageError(f"{path.name} contains no data")
    return signals


def _materialize(data, path: Path, description: str, max_pixels: int | None) -> np.ndarray:
    """The selected signal's pixels as a NumPy array, after the size check; lazy reads happen here."""
    _check_size(np.shape(data), path.name, max_pixels)
    if isinstance(data, np.ndarray):
        return data
    try:
        with _QuietTifffile():
            if hasattr(data, "compute"):
                data = data.compute(scheduler="synchronous")
            return np.array(data)
    except MemoryError:
        raise _too_large(path) from None
    except Exception as exc:  # noqa: BLE001 - a lazy read meets the truncation only now
        raise _unreadable(path, description, exc) from None


# --------------------------------------------------------------------------------------------- arrays


def _real_numbers(dtype: np.dtype) -> bool:
    """Integers or floats, or a record of them (RGB(A) pixels); not bool, complex, dates, text or objects.

    Checked before any conversion: ``astype(float)`` would quietly drop an imaginary part or turn a mask
    into an image.
    """
    if dtype.names:
        return all(_real_numbers(dtype.fields[name][0]) for name in dtype.names)
    return dtype.kind in "iuf" and dtype.shape == ()


def _to_grey(data: np.ndarray) -> tuple[np.ndarray, bool]:
    """Colour → luminance (ITU-R BT.601 weights); a grey image saved as RGB comes back unchanged."""
    weights = np.array([0.299, 0.587, 0.114])
    if data.dtype.names:
        names = [n for n in ("R", "G", "B") if n in data.dtype.names]
        if len(names) == 3:
            rgb = np.stack([data[n].astype(np.float64) for n in names], axis=-1)
            return rgb @ weights, True
        return data[data.dtype.names[0]].astype(np.float64), True
    if data.ndim == 3 and data.shape[-1] in (3, 4) and min(data.shape[:2]) > 4:
        return data[..., :3].astype(np.float64) @ weights, True
    return data, False


def _signal_axes(signal: dict, ndim: int) -> list[dict]:
    """The two image axes as (y, x).

    RosettaSciIO lists axes in array order; ``index_in_array`` is not used because some readers (PNG)
    fill it in the opposite order. An axes list that does not match the array's shape is ignored.
    """
    axes = [dict(a) for a in (signal.get("axes") or [])]
    shape = np.shape(signal.get("data"))
    if len(axes) != ndim or len(shape) != ndim:
        return []
    if any(int(a.get("size", n)) != n for a, n in zip(axes, shape)):
        return []
    return axes[-2:]


def _file_calibration(axes: list[dict]) -> tuple[tuple[float, float] | None, str | None]:
    if len(axes) != 2:
        return None, None
    sizes = []
    for axis in axes:
        factor = _length_factor(axis.get("units"))
        scale = axis.get("scale")
        if factor is None or scale is None:
            units = axis.get("units")
            if units is not None and ("/" in str(units) or "^-1" in str(units)):
                raise ImageError(f"the image axes are in reciprocal units ({units}): this is a diffraction pattern, not an image")
            return None, None
        sizes.append(abs(float(scale)) * factor)
    return (sizes[0], sizes[1]), str(axes[0].get("units"))


def align_and_sum(frames: np.ndarray, *, upsample_factor: int = 20) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Rigidly align frames to the first by cross-correlation and sum them.

    Returns the summed image, the (n, 2) shifts in px (y, x) applied to each frame, and the crop
    (top, bottom, left, right) in px. Shifts are measured with ``skimage.registration.
    phase_cross_correlation`` without spectral whitening (``normalization=None``): pure phase correlation
    amplifies the shot noise that dominates the high frequencies of a STEM frame and was 0.5 px off on
    noisy test stacks, the plain correlation ~0.05 px. A Tukey window keeps the frame edges out of the
    correlation; its small pull towards zero shift is removed by one re-measurement after shifting.
    Shifts are applied in Fourier space (no interpolation blur) and the wrapped margins are cropped, so
    every pixel of the result is a sum of real data from all frames.
    """
    from scipy.ndimage import fourier_shift
    from scipy.signal.windows import tukey
    from skimage.registration import phase_cross_correlation

    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 3:
        raise ImageError(f"a frame stack must be 3D (frames, y, x), got shape {frames.shape}")
    n, ny, nx = frames.shape
    window = np.outer(tukey(ny, 0.3), tukey(nx, 0.3))

    def prep(frame):
        return (frame - frame.mean()) * window

    def shifted(frame, shift):
        return np.fft.ifftn(fourier_shift(np.fft.fftn(frame), shift)).real

    reference = prep(frames[0])
    shifts = np.zeros((n, 2))
    total = frames[0].copy()
    for k in range(1, n):
        estimate = np.zeros(2)
        for _ in range(2):
            step, _, _ = phase_cross_correlation(
                reference, prep(shifted(frames[k], estimate)), upsample_factor=upsample_factor, normalization=None
            )
            estimate += step
        shifts[k] = estimate
        total += shifted(frames[k], estimate)
    top = int(math.ceil(max(0.0, shifts[:, 0].max()) - 1e-6))
    bottom = int(math.ceil(max(0.0, -shifts[:, 0].min()) - 1e-6))
    left = int(math.ceil(max(0.0, shifts[:, 1].max()) - 1e-6))
    right = int(math.ceil(max(0.0, -shifts[:, 1].min()) - 1e-6))
    if top + bottom >= ny or left + right >= nx:
        raise ImageError(f"frames drift by more than the image size (shifts up to {np.abs(shifts).max():.0f} px); pick one with frame=<index>")
    cropped = total[top: ny - bottom, left: nx - right]
    return cropped, shifts, (top, bottom, left, right)


def _select_signal(signals: list[dict], wanted_mode: str | None) -> tuple[int, dict]:
    """Pick the image among the file's datasets: the one matching the requested mode, else HAADF-like.

    Velox files hold one dataset per detector (HAADF, DF4, BF, ...) and often spectra; only 2D/3D
    numeric arrays are candidates.
    """
    candidates = []
    for i, signal in enumerate(signals):
        data = signal.get("data")
        if data is None:
            continue
        shape = np.shape(data)
        axes = signal.get("axes") or []
        if len(axes) == len(shape) and axes:
            image_axes = sum(1 for a in axes if not a.get("navigate", False))
            if image_axes != 2 or len(shape) > 3:
                continue
        if len(shape) in (2, 3):
            candidates.append(i)
    if not candidates:
        shapes = ", ".join(str(np.shape(s.get("data"))) for s in signals)
        raise ImageError(f"the file holds no 2D image (datasets of shape {shapes}); 4D-STEM and spectra are not supported")
    if len(candidates) == 1:
        return candidates[0], signals[candidates[0]]
    titles = {i: _mode_from_text(_get_path(signals[i].get("metadata") or {}, "General.title")) for i in candidates}
    for preference in ([wanted_mode] if wanted_mode else []) + ["haadf", "adf", "idpc"]:
        for i in candidates:
            if titles[i] == preference:
                return i, signals[i]
    return candidates[0], signals[candidates[0]]


# --------------------------------------------------------------------------------------------- main API


def read_image(
    path: str | os.PathLike,
    *,
    pixel_size_A=None,
    mode: str | None = None,
    voltage_kV: float | None = None,
    semiangle_mrad: float | None = None,
    frame: str | int = "sum",
    max_pixels: int | None = MAX_PIXELS,
    **microscope_overrides,
) -> StemImage:
    """Read a microscope image file into a validated, calibrated ``StemImage``.

    Precedence for every number: the caller's value, then the file's metadata, then a JSON sidecar, then
    the ``Microscope`` default; ``metadata`` records which one won (``calibration_source``,
    ``mode_source``, ``voltage_source``, ``semiangle_source``). A caller's pixel size that disagrees with
    the file by more than 1 % wins but raises ``CalibrationMismatchWarning`` and is recorded, because
    either the file or the user is wrong and a later lattice check should know both numbers.
    ``frame``: ``"sum"`` (align + sum all frames) or a frame index. ``max_pixels`` bounds the values read
    from the file (frames and colour channels included; ``None``: no limit); it is checked from the header,
    before the pixels are loaded, so a 16k × 16k scan is refused in milliseconds instead of filling the
    memory of a shared machine. Extra keyword arguments are
    ``Microscope`` fields (``defocus_A``, ``Cs_A``, ``source_size_A``, detector angles).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        supported = " ".join(sorted(set(SUPPORTED_EXTENSIONS)))
        raise ImageError(f"unsupported file type {suffix or '(no extension)'!r} for {path.name}; supported: {supported}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path.name} is empty (0 bytes)")
    if frame != "sum" and not (isinstance(frame, (int, np.integer)) and not isinstance(frame, bool)):
        raise ImageError(f"frame must be 'sum' or a frame index, got {frame!r}")
    allowed = {"defocus_A", "Cs_A", "detector_inner_mrad", "detector_outer_mrad", "source_size_A"}
    unknown = set(microscope_overrides) - allowed
    if unknown:
        raise AutomatError(f"unknown microscope parameter(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")
    if mode is not None and str(mode).lower() not in MODES:
        raise AutomatError(f"unknown imaging mode {mode!r}; choose one of {', '.join(MODES)}")

    reader, description = SUPPORTED_EXTENSIONS[suffix]
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer))
                                   or max_pixels < 1):
        raise AutomatError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    raw = _read_raw(path, reader, description, max_pixels)
    if isinstance(raw, StemImage):  # our own .npz: already complete, the caller may still override
        return _override_native(raw, path, file_sha256(path), pixel_size_A, mode, voltage_kV, semiangle_mrad,
                                microscope_overrides)

    index, signal = _select_signal(raw, str(mode).lower() if mode else None)
    metadata: dict[str, Any] = {"format": description, "reader": "numpy" if reader == "numpy" else f"rsciio.{reader}"}
    if len(raw) > 1:
        metadata["dataset_index"] = index
        metadata["datasets"] = [json_safe(_get_path(s.get("metadata") or {}, "General.title")) for s in raw]

    data = _materialize(signal["data"], path, description, max_pixels)
    sha256 = file_sha256(path)  # after the size check: hashing a refused 1 GB file would take seconds
    metadata["original_dtype"] = str(data.dtype)
    if not _real_numbers(data.dtype):
        raise ImageError(f"{path.name}: pixels must be real numbers, got dtype {data.dtype}")
    axes = _signal_axes(signal, data.ndim)
    data, was_colour = _to_grey(data)
    if was_colour:
        metadata["converted_from_colour"] = True
        axes = axes if len(axes) == 2 else []
    if data.ndim not in (2, 3):
        raise ImageError(f"{path.name}: expected a 2D image or a 3D frame stack, got shape {data.shape}")
    if data.size == 0:
        raise ImageError(f"{path.name} contains an empty array of shape {data.shape}")
    check_pixels(data)
    image_shape = tuple(int(s) for s in data.shape[-2:])
    metadata["original_shape"] = list(data.shape)

    # --- calibration: user > file > sidecar
    file_pixel, file_units = _file_calibration(axes)
    sidecar_path = _sidecar_path(path)
    sidecar = _read_sidecar(sidecar_path) if sidecar_path else None
    sidecar_pixel = _sidecar_calibration(sidecar, image_shape, sidecar_path.name) if sidecar else None
    if sidecar_path:
        metadata["sidecar"] = sidecar_path.name
    known_pixel, known_source = (file_pixel, "file") if file_pixel else (sidecar_pixel, "sidecar") if sidecar_pixel else (None, None)
    if file_pixel:
        metadata["file_units"] = file_units
    if pixel_size_A is not None:
        from .image import _as_pixel_size

        user_pixel = _as_pixel_size(pixel_size_A)
        if known_pixel is not None:
            metadata[f"pixel_size_{known_source}_A"] = list(known_pixel)
            rel = max(abs(u - k) / k for u, k in zip(user_pixel, known_pixel))
            if rel > _MISMATCH_TOLERANCE:
                message = (f"{path.name}: given pixel size {user_pixel} Å differs from the {known_source} calibration "
                           f"{tuple(round(k, 6) for k in known_pixel)} Å by {100 * rel:.1f} %; using the given value")
                warnings.warn(message, CalibrationMismatchWarning, stacklevel=2)
                metadata["calibration_mismatch"] = {"source": known_source, "relative": rel}
        pixel, metadata["calibration_source"] = user_pixel, "user"
    elif known_pixel is not None:
        pixel, metadata["calibration_source"] = known_pixel, known_source
    else:
        raise CalibrationError(f"{path.name} has no pixel size calibration; {_HOW_TO_CALIBRATE}")

    # --- optics: user > file > sidecar > default
    file_optics = _file_optics(signal) if reader != "numpy" else {}
    mapped = file_optics.pop("_mapped", {})
    sidecar_optics = _optics_from_tree(sidecar) if sidecar else {}
    title = _get_path(mapped, "General.title")
    if title:
        metadata["title"] = title
    user = {"mode": str(mode).lower() if mode else None, "voltage_kV": voltage_kV, "semiangle_mrad": semiangle_mrad}
    fields: dict[str, Any] = {}
    for name, short in (("mode", "mode"), ("voltage_kV", "voltage"), ("semiangle_mrad", "semiangle")):
        for source, value in (("user", user[name]), ("file", file_optics.get(name)), ("sidecar", sidecar_optics.get(name))):
            if value is not None:
                fields[name] = value
                metadata[f"{short}_source"] = source
                break
        else:
            metadata[f"{short}_source"] = "default"
        if user[name] is not None and file_optics.get(name) is not None and file_optics[name] != user[name]:
            metadata[f"{name}_file"] = file_optics[name]
    fields.update(microscope_overrides)
    try:
        microscope = Microscope(**fields)
    except (TypeError, ValueError) as exc:
        raise AutomatError(f"invalid microscope settings for {path.name}: {exc}") from None
    if microscope_overrides:
        metadata["microscope_overrides"] = sorted(microscope_overrides)

    # --- frames
    if data.ndim == 3:
        n_frames = data.shape[0]
        metadata["n_frames"] = int(n_frames)
        if frame == "sum":
            if n_frames == 1:
                data = data[0]
            else:
                data, shifts, crop = align_and_sum(data)
                metadata["frames"] = "aligned_sum"
                metadata["frame_shifts_px"] = shifts.round(3).tolist()
                metadata["crop_px"] = list(crop)
        else:
            if not -n_frames <= int(frame) < n_frames:
                raise ImageError(f"{path.name} has {n_frames} frames; frame={frame} is out of range")
            data = data[int(frame)]
            metadata["frames"] = int(frame)
    elif frame not in ("sum", 0):
        raise ImageError(f"{path.name} is a single frame; frame={frame} is out of range")

    image = StemImage(
        data=np.asarray(data, dtype=np.float64),
        pixel_size_A=pixel,
        microscope=microscope,
        source=path.name,
        sha256=sha256,
        metadata=json_safe(metadata),
    )
    return image.validate()


def _override_native(image, path, sha256, pixel_size_A, mode, voltage_kV, semiangle_mrad, overrides) -> StemImage:
    """A native .npz is already calibrated; caller arguments still win, recorded like any other file."""
    metadata = dict(image.metadata)
    changes: dict[str, Any] = {}
    if pixel_size_A is not None:
        from .image import _as_pixel_size

        user_pixel = _as_pixel_size(pixel_size_A)
        rel = max(abs(u - k) / k for u, k in zip(user_pixel, image.pixel_size_A))
        if rel > _MISMATCH_TOLERANCE:
            warnings.warn(f"{path.name}: given pixel size {user_pixel} Å differs from the file's {image.pixel_size_A} Å "
                          f"by {100 * rel:.1f} %; using the given value", CalibrationMismatchWarning, stacklevel=3)
            metadata["calibration_mismatch"] = {"source": "file", "relative": rel}
        metadata["pixel_size_file_A"] = list(image.pixel_size_A)
        metadata["calibration_source"] = "user"
        changes["pixel_size_A"] = user_pixel
    micro = {k: v for k, v in (("mode", mode), ("voltage_kV", voltage_kV), ("semiangle_mrad", semiangle_mrad)) if v is not None}
    micro.update(overrides)
    if micro:
        try:
            changes["microscope"] = image.microscope.replace(**micro)
        except (TypeError, ValueError) as exc:
            raise AutomatError(f"invalid microscope settings for {path.name}: {exc}") from None
        for name, short in (("mode", "mode"), ("voltage_kV", "voltage"), ("semiangle_mrad", "semiangle")):
            if name in micro:
                metadata[f"{short}_source"] = "user"
    return image.replace(metadata=json_safe(metadata), source=image.source or path.name, sha256=image.sha256, **changes).validate()


# --------------------------------------------------------------------------------------------- native


def stem_image_to_record(image: StemImage) -> tuple[np.ndarray, dict]:
    """The one conversion of a ``StemImage`` into (float32 array, JSON-safe dict of everything else).

    Shared by the .npz format and ``StemImageData`` so that files and database nodes cannot drift apart.
    """
    record = {
        "format": NATIVE_FORMAT,
        "version": NATIVE_VERSION,
        "pixel_size_A": [float(v) for v in image.pixel_size_A],
        "microscope": json_safe(image.microscope.as_dict()),
        "dose_e_per_A2": None if image.dose_e_per_A2 is None else float(image.dose_e_per_A2),
        "source": image.source,
        "sha256": image.sha256,
        "metadata": json_safe(dict(image.metadata)),
    }
    return np.asarray(image.data, dtype=np.float32), record


def stem_image_from_record(data: np.ndarray, record: Mapping) -> StemImage:
    """Inverse of ``stem_image_to_record``; unknown record versions are refused rather than guessed."""
    if record.get("format", NATIVE_FORMAT) != NATIVE_FORMAT or int(record.get("version", NATIVE_VERSION)) > NATIVE_VERSION:
        raise ImageError(f"unsupported stored image format {record.get('format')!r} version {record.get('version')!r}")
    try:
        microscope = Microscope.from_dict(dict(record.get("microscope") or {}))
    except (TypeError, ValueError) as exc:
        raise ImageError(f"stored image has invalid microscope settings: {exc}") from None
    return StemImage(
        data=np.asarray(data, dtype=np.float32),
        pixel_size_A=tuple(record["pixel_size_A"]),
        microscope=microscope,
        dose_e_per_A2=record.get("dose_e_per_A2"),
        source=record.get("source"),
        sha256=record.get("sha256"),
        metadata=dict(record.get("metadata") or {}),
    )


def save_stem_image(path, image: StemImage) -> None:
    """Write ``image`` losslessly: ``data`` (float32) + ``record`` (JSON string of all other fields).

    ``path`` may be a file name or a binary file object. Metadata is stored JSON-safe (tuples become
    lists), which is the form ``read_image`` already produces.
    """
    data, record = stem_image_to_record(image)
    text = json.dumps(record, sort_keys=True, allow_nan=False)
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
    np.savez(path, data=data, record=np.array(text))


def _from_native(archive, name: str) -> StemImage:
    try:
        record = json.loads(str(archive["record"][()]))
        if not isinstance(record, Mapping):
            raise ValueError(f"the record is a JSON {type(record).__name__}, not an object")
        return stem_image_from_record(archive["data"], record)
    except AutomatError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, zlib, JSON and missing-field errors all mean a corrupt file
        raise ImageError(f"{name} is a corrupt stored image ({_first_line(exc)})") from None


def load_stem_image(path) -> StemImage:
    """Read what ``save_stem_image`` wrote (a path, bytes or a binary file object)."""
    name = Path(path).name if isinstance(path, (str, os.PathLike)) else "stored image"
    if isinstance(path, (bytes, bytearray)):
        path = _io.BytesIO(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ImageError(f"stored image not found: {path}") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"{name} is not a readable stored image ({_first_line(exc)})") from None
    if not hasattr(archive, "files") or "record" not in archive.files or "data" not in archive.files:
        raise ImageError(f"{name} is not an aiida-automat stored image (expected arrays 'data' and 'record')")
    with archive:
        return _from_native(archive, name)
