"""``StemImageData``: a calibrated STEM image as an AiiDA node.

The array lives in the repository (ArrayData), everything a later stage filters or queries on —
pixel size, optics, dose, source file hash — lives in attributes, so that
``QueryBuilder`` can find "all 60 kV HAADF images of this file" without opening arrays.
Conversion to and from the core ``StemImage`` goes through ``imaging.io.stem_image_to_record`` /
``stem_image_from_record``, the same pair the .npz exchange format uses: there is exactly one mapping
between the dataclass and its stored form.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from aiida.orm import ArrayData

from ..imaging.microscope import Microscope
from ..errors import ImageError
from ..imaging.image import StemImage
from ..imaging.io import stem_image_from_record, stem_image_to_record

__all__ = ("StemImageData",)

ARRAY_NAME = "image"
#: Microscope fields stored as top-level attributes (queryable), in ``Microscope`` order.
MICROSCOPE_FIELDS = tuple(f.name for f in dataclasses.fields(Microscope))


def _check_array(data) -> np.ndarray:
    array = np.asarray(data)
    if array.ndim != 2:
        raise ImageError(f"a STEM image must be 2D, got an array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ImageError(f"image pixels must be real numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ImageError(f"image has {int(array.size - np.count_nonzero(np.isfinite(array)))} NaN/inf pixel(s)")
    return array


class StemImageData(ArrayData):
    """A 2D float32 image plus its calibration, optics and source, as attributes.

    Build it from a core ``StemImage`` (``StemImageData(image)`` or ``from_stem_image``) or from a file
    (``from_file``); get the core object back with ``to_stem_image()``. Construction rejects arrays that
    are not 2D or hold NaN/inf, because a stored node is provenance and must be usable by every
    downstream step.
    """

    def __init__(self, image: StemImage | None = None, **kwargs):
        super().__init__(**kwargs)
        if image is not None:
            self._set_stem_image(image)

    # ------------------------------------------------------------------ conversions (the only ones)

    @classmethod
    def from_stem_image(cls, image: StemImage, **kwargs) -> "StemImageData":
        return cls(image=image, **kwargs)

    @classmethod
    def from_file(cls, path, **read_kwargs) -> "StemImageData":
        """Read any supported microscope file (see ``imaging.io.read_image``) into a node."""
        from ..imaging.io import read_image

        return cls(image=read_image(path, **read_kwargs))

    def to_stem_image(self) -> StemImage:
        record = {
            "pixel_size_A": self.base.attributes.get("pixel_size_A"),
            "microscope": {name: self.base.attributes.get(name) for name in MICROSCOPE_FIELDS},
            "dose_e_per_A2": self.base.attributes.get("dose_e_per_A2", None),
            "source": self.base.attributes.get("source", None),
            "sha256": self.base.attributes.get("sha256", None),
            "metadata": self.base.attributes.get("metadata", {}),
        }
        return stem_image_from_record(self.get_array(ARRAY_NAME), record)

    def _set_stem_image(self, image: StemImage) -> None:
        if not isinstance(image, StemImage):
            raise TypeError(f"expected a StemImage, got {type(image).__name__}")
        data, record = stem_image_to_record(image)
        self.set_array(ARRAY_NAME, _check_array(data))
        attributes = self.base.attributes
        attributes.set("pixel_size_A", record["pixel_size_A"])
        for name in MICROSCOPE_FIELDS:
            attributes.set(name, record["microscope"][name])
        attributes.set("dose_e_per_A2", record["dose_e_per_A2"])
        attributes.set("source", record["source"])
        attributes.set("sha256", record["sha256"])
        attributes.set("metadata", record["metadata"])

    # ------------------------------------------------------------------ validation and accessors

    def _validate(self):
        super()._validate()
        if ARRAY_NAME not in self.get_arraynames():
            raise ValueError("StemImageData has no image; build it with StemImageData(image) or from_file(path)")
        if self.base.attributes.get("pixel_size_A", None) is None:
            raise ValueError("StemImageData has no pixel size")
        return True

    @property
    def image(self) -> np.ndarray:
        return self.get_array(ARRAY_NAME)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.base.attributes.get(f"{self.array_prefix}{ARRAY_NAME}"))

    @property
    def pixel_size_A(self) -> tuple[float, float]:
        return tuple(self.base.attributes.get("pixel_size_A"))

    @property
    def mode(self) -> str:
        return self.base.attributes.get("mode")

    @property
    def voltage_kV(self) -> float:
        return self.base.attributes.get("voltage_kV")

    @property
    def sha256(self) -> str | None:
        return self.base.attributes.get("sha256", None)

    @property
    def source(self) -> str | None:
        return self.base.attributes.get("source", None)

    @property
    def dose_e_per_A2(self) -> float | None:
        return self.base.attributes.get("dose_e_per_A2", None)

    @property
    def metadata(self) -> dict:
        return self.base.attributes.get("metadata", {})
