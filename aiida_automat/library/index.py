"""``TemplateLibrary``: the compact, self-contained index a retrieval reads.

One ``.npz`` holds everything: the standardised structures (numbers, positions, cells, so a candidate
comes back as an ``Atoms`` without the original files), their metadata, the fast-model Fourier
coefficients per imaging mode on the shared (h, k) half-grid, the microscope of each mode, and a build
key (sha256 of the inputs: structures, modes, optics, descriptor version) that decides whether a library
must be rebuilt. The file's own sha256 is what the AiiDA node stores.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from ..hashing import file_sha256
from ..errors import LibraryError
from ..imaging.microscope import Microscope

__all__ = ["TemplateLibrary", "DESCRIPTOR_VERSION", "file_sha256"]

DESCRIPTOR_VERSION = 4  # 3: annular fast model with column stacking + detector-edge transfer; 4: projected column shape




@dataclass(frozen=True, eq=False)
class TemplateLibrary:
    """Template structures + descriptors, vectorised over templates (arrays have length ``n``)."""

    name: str
    ids: np.ndarray  # (n,) str
    formulas: np.ndarray  # (n,) str, reduced formula
    anonymous: np.ndarray  # (n,) str, e.g. AB2
    elements: np.ndarray  # (n,) str, space separated, sorted
    lattice_types: np.ndarray  # (n,) str
    sources: np.ndarray  # (n,) str
    cells: np.ndarray  # (n, 3, 3) Å, standardised (a ∥ x, reduced, right-handed)
    numbers: np.ndarray  # (total,) int
    positions: np.ndarray  # (total, 3) Å
    offsets: np.ndarray  # (n + 1,) into numbers/positions
    hk: np.ndarray  # (m, 2) int, shared half-grid
    coefficients: dict  # mode -> (n, m) complex
    microscopes: dict  # mode -> Microscope
    build_key: str = ""
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.coefficients)

    @property
    def cells_2d(self) -> np.ndarray:
        return self.cells[:, :2, :2]

    def index_of(self, template_id: str) -> int:
        hits = np.flatnonzero(self.ids == template_id)
        if not len(hits):
            raise LibraryError(f"template {template_id!r} is not in library {self.name!r}")
        return int(hits[0])

    def atoms(self, i: int | str):
        from ase import Atoms

        i = self.index_of(i) if isinstance(i, str) else int(i)
        s, e = self.offsets[i], self.offsets[i + 1]
        at = Atoms(numbers=self.numbers[s:e], positions=self.positions[s:e], cell=self.cells[i], pbc=(True, True, False))
        at.info.update({"template_id": str(self.ids[i]), "source": str(self.sources[i])})
        return at

    def element_sets(self) -> list[frozenset]:
        return [frozenset(str(e).split()) for e in self.elements]

    def summary(self) -> dict:
        import collections

        return {
            "name": self.name,
            "n_templates": len(self),
            "modes": list(self.modes),
            "microscopes": {m: mic.as_dict() for m, mic in self.microscopes.items()},
            "lattice_types": dict(collections.Counter(self.lattice_types.tolist())),
            "sources": dict(collections.Counter(self.sources.tolist())),
            "build_key": self.build_key,
            **{k: v for k, v in self.meta.items() if k not in ("inputs",)},
        }

    def microscope_for(self, mode: str) -> Microscope:
        if mode not in self.microscopes:
            raise LibraryError(f"library {self.name!r} has no templates for mode {mode!r} (has {', '.join(self.modes)})")
        return self.microscopes[mode]

    def subset(self, indices) -> "TemplateLibrary":
        """A library with only the given templates (for leave-out tests and benchmarks).

        Its build key names the kept ids, so two different subsets of one library never share a key (a
        stored subset is found again by it).
        """
        idx = np.asarray(indices, dtype=int)
        kept = hashlib.sha256("\n".join(str(t) for t in self.ids[idx]).encode()).hexdigest()[:16]
        nums, poss, offs = [], [], [0]
        for i in idx:
            s, e = self.offsets[i], self.offsets[i + 1]
            nums.append(self.numbers[s:e])
            poss.append(self.positions[s:e])
            offs.append(offs[-1] + e - s)
        return TemplateLibrary(
            name=self.name, ids=self.ids[idx], formulas=self.formulas[idx], anonymous=self.anonymous[idx],
            elements=self.elements[idx], lattice_types=self.lattice_types[idx], sources=self.sources[idx],
            cells=self.cells[idx], numbers=np.concatenate(nums) if nums else np.zeros(0, int),
            positions=np.concatenate(poss) if poss else np.zeros((0, 3)), offsets=np.asarray(offs),
            hk=self.hk, coefficients={m: c[idx] for m, c in self.coefficients.items()},
            microscopes=dict(self.microscopes), build_key=f"{self.build_key}:subset{len(idx)}:{kept}", meta=dict(self.meta),
        )

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        arrays = {
            "ids": self.ids.astype(str), "formulas": self.formulas.astype(str), "anonymous": self.anonymous.astype(str),
            "elements": self.elements.astype(str), "lattice_types": self.lattice_types.astype(str),
            "sources": self.sources.astype(str), "cells": self.cells, "numbers": self.numbers,
            "positions": self.positions, "offsets": self.offsets, "hk": self.hk,
        }
        for mode, c in self.coefficients.items():
            arrays[f"coeff_{mode}"] = np.asarray(c, dtype=np.complex64)
        header = {
            "name": self.name, "build_key": self.build_key, "descriptor_version": DESCRIPTOR_VERSION,
            "microscopes": {m: mic.as_dict() for m, mic in self.microscopes.items()}, "meta": self.meta,
        }
        arrays["header"] = np.array(json.dumps(header, sort_keys=True))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    def save(self, path) -> str:
        """Write the index; returns its sha256."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_bytes()
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_sha256: str | None = None) -> "TemplateLibrary":
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise LibraryError("template library index is corrupt: its sha256 does not match the recorded one")
        try:
            z = np.load(io.BytesIO(data), allow_pickle=False)
            header = json.loads(str(z["header"]))
        except Exception as exc:  # noqa: BLE001
            raise LibraryError(f"cannot read template library index: {exc}") from None
        if header.get("descriptor_version") != DESCRIPTOR_VERSION:
            raise LibraryError(
                f"template library was built with descriptor version {header.get('descriptor_version')}, "
                f"this code needs {DESCRIPTOR_VERSION}: rebuild it (aiida-automat library build)"
            )
        micro = {m: Microscope.from_dict(d) for m, d in header["microscopes"].items()}
        coeffs = {m: np.asarray(z[f"coeff_{m}"], dtype=np.complex128) for m in micro}
        return cls(
            name=header["name"], ids=z["ids"], formulas=z["formulas"], anonymous=z["anonymous"], elements=z["elements"],
            lattice_types=z["lattice_types"], sources=z["sources"], cells=z["cells"], numbers=z["numbers"],
            positions=z["positions"], offsets=z["offsets"], hk=z["hk"], coefficients=coeffs, microscopes=micro,
            build_key=header["build_key"], meta=header.get("meta", {}),
        )

    @classmethod
    def load(cls, path, *, expected_sha256: str | None = None) -> "TemplateLibrary":
        path = pathlib.Path(path)
        if not path.is_file():
            raise LibraryError(f"template library index {path} does not exist")
        return cls.from_bytes(path.read_bytes(), expected_sha256=expected_sha256)
