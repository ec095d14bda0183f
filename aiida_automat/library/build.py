"""Build a template library from a structure set.

``build_library`` standardises every structure (``structures.standardise_2d``), computes the fast-model
Fourier coefficients of its cell for each imaging mode (``descriptors.template_coefficients``) and packs
them into a ``TemplateLibrary``. The build key is a sha256 of the *inputs* (structure files' bytes or the
structures themselves, modes, optics, descriptor version), computable without building, so callers (the
AiiDA layer, the CLI) rebuild only when an input changed.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import LibraryError
from ..imaging.microscope import Microscope
from .descriptors import HMAX, half_grid, template_coefficients
from .index import DESCRIPTOR_VERSION, TemplateLibrary, file_sha256
from .structures import TemplateStructure, bundled_structure_files, load_structure_set, make_template, standardise_2d, structure_files

__all__ = ["DEFAULT_MODES", "build_library", "build_key", "library_microscopes"]

DEFAULT_MODES = ("idpc", "adf")


def library_microscopes(modes: Sequence[str] = DEFAULT_MODES, microscope: Microscope | None = None, **optics) -> dict:
    """One ``Microscope`` per mode sharing the optics of ``microscope`` (or the defaults + ``optics``).

    Detector angles are reset to each mode's defaults unless the given microscope is of that mode.
    """
    base = microscope if microscope is not None else Microscope(**optics)
    out = {}
    for mode in modes:
        mode = str(mode).lower()
        if mode == base.mode:
            out[mode] = base
        else:
            out[mode] = base.replace(mode=mode, detector_inner_mrad=None, detector_outer_mrad=None)
    if not out:
        raise LibraryError("a library needs at least one imaging mode")
    return out


def _structures_fingerprint(structures) -> str:
    h = hashlib.sha256()
    if structures is None:
        for f in bundled_structure_files():
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
        return h.hexdigest()
    if isinstance(structures, (str, pathlib.Path)):
        structures = [structures]
    for s in structures:
        if isinstance(s, (str, pathlib.Path)):
            for f in structure_files(s):
                h.update(f.name.encode())
                h.update(file_sha256(f).encode())
        else:
            atoms = s.atoms if isinstance(s, TemplateStructure) else s
            tid = s.template_id if isinstance(s, TemplateStructure) else str(atoms.info.get("template_id", ""))
            h.update(tid.encode())
            h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
            h.update(np.round(np.asarray(atoms.positions, dtype=float), 5).tobytes())
            h.update(np.round(np.asarray(atoms.cell[:], dtype=float), 5).tobytes())
    return h.hexdigest()


def build_key(structures, microscopes: dict) -> str:
    """sha256 of everything a library depends on (cheap: files are hashed, not parsed)."""
    payload = {
        "structures": _structures_fingerprint(structures),
        "microscopes": {m: mic.as_dict() for m, mic in sorted(microscopes.items())},
        "descriptor_version": DESCRIPTOR_VERSION,
        "hmax": HMAX,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _as_templates(structures) -> list[TemplateStructure]:
    if structures is None or isinstance(structures, (str, pathlib.Path)):
        return load_structure_set(structures)
    items = list(structures)
    if items and all(isinstance(s, (str, pathlib.Path)) for s in items):
        return load_structure_set(items)
    out = []
    for i, s in enumerate(items):
        if isinstance(s, TemplateStructure):
            out.append(s)
        else:
            tid = str(s.info.get("template_id") or s.info.get("material_id") or s.info.get("structure_label") or f"structure-{i}")
            out.append(make_template(standardise_2d(s), tid, source=str(s.info.get("source", "user"))))
    return out


def build_library(
    structures=None,
    *,
    name: str = "default",
    modes: Iterable[str] = DEFAULT_MODES,
    microscope: Microscope | None = None,
    progress: Callable[[int, int], None] | None = None,
    **optics,
) -> TemplateLibrary:
    """Build a ``TemplateLibrary``.

    ``structures``: ``None`` (the bundled 2DMatPedia subset + MC2D monolayers), a file or folder (extxyz,
    CIF, POSCAR, ...), a list of paths, or a list of ``ase.Atoms`` / ``TemplateStructure``.
    ``microscope`` or ``optics`` (``voltage_kV=...``, ``semiangle_mrad=...``) set the optics shared by all
    modes. ``progress(done, total)`` is called after each template (for a progress bar).
    """
    t0 = time.perf_counter()
    microscopes = library_microscopes(tuple(modes), microscope, **optics)
    key = build_key(structures, microscopes)
    templates = _as_templates(structures)
    hk = half_grid()
    n = len(templates)
    coeffs = {m: np.zeros((n, len(hk)), dtype=np.complex128) for m in microscopes}
    keep = []
    for i, t in enumerate(templates):
        try:
            for m, mic in microscopes.items():
                coeffs[m][i] = template_coefficients(t.atoms, mic, hk)
            keep.append(i)
        except Exception:  # noqa: BLE001 - an element without scattering factors etc.: skip the template
            pass
        if progress is not None:
            progress(i + 1, n)
    if not keep:
        raise LibraryError("no template could be simulated")
    templates = [templates[i] for i in keep]
    coeffs = {m: c[keep] for m, c in coeffs.items()}
    offsets = np.cumsum([0] + [len(t.atoms) for t in templates])
    lib = TemplateLibrary(
        name=name,
        ids=np.array([t.template_id for t in templates]),
        formulas=np.array([t.formula for t in templates]),
        anonymous=np.array([t.anonymous_formula for t in templates]),
        elements=np.array([" ".join(t.elements) for t in templates]),
        lattice_types=np.array([t.lattice_type for t in templates]),
        sources=np.array([t.source for t in templates]),
        cells=np.array([np.asarray(t.atoms.cell[:], dtype=float) for t in templates]),
        numbers=np.concatenate([t.atoms.numbers for t in templates]).astype(np.int64),
        positions=np.concatenate([t.atoms.positions for t in templates]).astype(float),
        offsets=offsets.astype(np.int64),
        hk=hk,
        coefficients=coeffs,
        microscopes=microscopes,
        build_key=key,
        meta={"n_skipped": n - len(templates), "build_seconds": round(time.perf_counter() - t0, 2),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )
    return lib
