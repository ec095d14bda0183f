"""Benchmark image sets: pick structures by tier, simulate STEM images, write images + truth + manifest.

``generate`` picks monolayers from a structure file (2DMatPedia by default) in equal shares of unary,
binary and ternary compounds (as AutoMat's STEM2Mat benchmark), strains each by a random biaxial ε in
±``max_strain`` (that strained structure is the truth), and images it in every mode at every dose with a
random in-plane rotation and offset. Multislice (abTEM, one unit cell, band-limited tiling, see
``imaging.simulate``) runs once per (structure, mode); its cell coefficients are cached on disk in
``out_dir/cache`` so an interrupted or extended run (more doses) never repeats it. Existing image files
are skipped, and every random number is derived from (seed, structure index), so a resumed run writes
exactly what an uninterrupted one would.

Layout of ``out_dir``::

    manifest.json                 settings, structures (id, formula, tier, strain, DFT energy), images
    truth/<id>.extxyz             true strained structure (info: material_id, energy_per_atom, strain, ...)
    images/<id>_<mode>_<dose>.npz StemImage (``imaging.io.save_stem_image``), metadata incl. the truth id
    cache/<id>_<mode>.npz         multislice cell coefficients
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import AutomatError, SimulationError

__all__ = ["DEFAULT_DOSES", "DEFAULT_MODES", "PRESETS", "GenerateResult", "generate", "image_name", "pick_structures",
           "unstrained", "default_structures_path"]

DEFAULT_MODES = ("idpc", "adf")
DEFAULT_DOSES = (3e3, 1e4, 3e4, 6e4)
MAX_ATOMS = 12
TIERS = {1: "unary", 2: "binary", 3: "ternary"}
MANIFEST_VERSION = 1

#: Named benchmark sets, reproducible from the bundled data alone (``bench generate --preset NAME``).
#: ``stem2mat-small``: 60 structures (20 per tier) × iDPC and ADF × 4 doses = 480 images at 80 kV; the
#: multislice runs once per (structure, mode), so its generation time is set by the 120 multislice runs, not
#: by the doses (measured in docs/_sections/bench_pipeline.md).
PRESETS = {
    "stem2mat-small": {"n": 60, "modes": ("idpc", "adf"), "doses": (3e3, 1e4, 3e4, 6e4), "seed": 0,
                       "pixel_size_A": 0.1, "size": 256, "voltage_kV": 80.0, "semiangle_mrad": 30.0,
                       "method": "multislice"},
}


def default_structures_path() -> pathlib.Path:
    """The 2DMatPedia subset (it carries DFT energies): ../shared in a checkout, else the bundled copy."""
    root = pathlib.Path(__file__).resolve().parents[2]
    shared = root.parent / "shared" / "data" / "structures" / "2dmatpedia_subset.extxyz"
    if shared.is_file():
        return shared
    from ..library.structures import RESOURCES

    return RESOURCES / "2dmatpedia_subset.extxyz"


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", str(text)).strip("-") or "structure"


def structure_id(atoms, i: int) -> str:
    info = atoms.info
    return _safe_id(info.get("material_id") or info.get("structure_label") or info.get("template_id") or f"s{i}")


def dose_label(dose: float) -> str:
    return str(int(round(float(dose))))


def image_name(structure: str, mode: str, dose: float) -> str:
    return f"{structure}_{mode}_{dose_label(dose)}.npz"


def tier_of(atoms) -> int:
    return len(set(atoms.get_chemical_symbols()))


def pick_structures(structures, n: int, seed: int, *, max_atoms: int = MAX_ATOMS, tiers=(1, 2, 3),
                    require_energy: bool = False) -> list:
    """``n`` structures in equal shares of the tiers (remainder to the lower tiers), seeded.

    ``structures``: a path (any ASE-readable multi-frame file) or a list of Atoms. Entries with more than
    ``max_atoms`` atoms or that are not valid layers are skipped; each chosen Atoms gets
    ``info["bench_id"]`` (material_id or structure_label) and ``info["tier"]``.
    """
    from ..imaging.structures import validate_layer

    if isinstance(structures, (str, os.PathLike)):
        from ase.io import read

        path = pathlib.Path(structures)
        if not path.exists():
            raise FileNotFoundError(f"structure file {path} does not exist")
        frames = read(path, index=":")
    else:
        frames = list(structures)
    pool = {k: [] for k in tiers}
    for i, atoms in enumerate(frames):
        if len(atoms) > max_atoms:
            continue
        k = tier_of(atoms)
        if k not in pool:
            continue
        if require_energy and not np.isfinite(float(atoms.info.get("energy_per_atom", np.nan))):
            continue
        try:
            validate_layer(atoms)
        except AutomatError:
            continue
        atoms = atoms.copy()
        atoms.info["bench_id"] = structure_id(atoms, i)
        atoms.info["tier"] = TIERS.get(k, f"{k}-ary")
        pool[k].append(atoms)
    rng = np.random.default_rng(seed)
    chosen = []
    for j, k in enumerate(tiers):
        want = n // len(tiers) + (1 if j < n % len(tiers) else 0)
        idx = rng.permutation(len(pool[k]))[:want]
        chosen += [pool[k][i] for i in sorted(idx)]
    if not chosen:
        raise AutomatError(f"no structure with ≤ {max_atoms} atoms in tiers {tiers} to pick from")
    ids = [a.info["bench_id"] for a in chosen]
    if len(set(ids)) != len(ids):
        for i, a in enumerate(chosen):
            a.info["bench_id"] = f"{a.info['bench_id']}-{i}"
    return chosen


def unstrained(truth):
    """The template a library would hold: the truth with its biaxial strain removed (info["strain"])."""
    eps = float(truth.info.get("strain", 0.0))
    out = truth.copy()
    cell = np.asarray(out.cell[:], dtype=float).copy()
    pos = out.positions.copy()
    cell[:, :2] /= 1.0 + eps
    pos[:, :2] /= 1.0 + eps
    out.set_cell(cell, scale_atoms=False)
    out.positions = pos
    return out


@dataclass(frozen=True)
class GenerateResult:
    out_dir: pathlib.Path
    n_structures: int
    n_images: int
    n_written: int
    n_skipped: int
    n_failed: int
    seconds: float
    errors: tuple[str, ...] = ()


def _save_coeffs(path: pathlib.Path, c) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, g_invA=c.g_invA, lattice_A=c.lattice_A, names=np.array(sorted(c.channels)),
             channels=np.stack([c.channels[k] for k in sorted(c.channels)]),
             meta=np.array(json.dumps({"mode": c.mode, "detector_angle_deg": c.detector_angle_deg, "method": c.method})))
    os.replace(tmp, path)


def _load_coeffs(path: pathlib.Path):
    from ..imaging.fastsim import CellCoefficients

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"][()]))
        channels = {str(k): z["channels"][i] for i, k in enumerate(z["names"])}
        return CellCoefficients(g_invA=z["g_invA"], channels=channels, mode=meta["mode"],
                                detector_angle_deg=float(meta["detector_angle_deg"]), lattice_A=z["lattice_A"],
                                method=meta["method"])


def _plan(atoms, index: int, seed: int, modes, max_strain: float, max_offset_A: float) -> dict:
    """All random numbers of one structure, from (seed, index) only: resuming changes nothing."""
    rng = np.random.default_rng([int(seed), int(index)])
    eps = float(rng.uniform(-max_strain, max_strain))
    per_mode = {}
    for mode in modes:
        per_mode[mode] = {"rotation_deg": float(rng.uniform(0.0, 360.0)),
                          "offset_A": [float(v) for v in rng.uniform(0.0, max_offset_A, size=2)],
                          "noise_seed": int(rng.integers(1 << 31))}
    return {"strain": eps, "modes": per_mode}


def generate(structures_path=None, out_dir="bench", *, n: int = 9, modes: Sequence[str] = DEFAULT_MODES,
             doses: Sequence[float] = DEFAULT_DOSES, seed: int = 0, pixel_size_A: float = 0.1, size: int = 256,
             voltage_kV: float = 80.0, semiangle_mrad: float = 30.0, method: str = "multislice",
             max_strain: float = 0.02, max_atoms: int = MAX_ATOMS, structures=None, workers: int = 1,
             progress: Callable[[int, int, str], None] | None = None) -> GenerateResult:
    """Write a benchmark set to ``out_dir`` (see the module doc); existing images are skipped (resume).

    ``structures`` (a list of Atoms) replaces the file at ``structures_path``; ``method="fast"`` uses the
    linear model instead of multislice (tests). ``workers`` > 1 writes that many structures at a time in
    spawned processes (the files are the same). ``progress(done, total, label)`` is called per image
    (per structure with workers).
    """
    from ..imaging.structures import reduced_formula

    t0 = time.perf_counter()
    modes = tuple(str(m).lower() for m in modes)
    doses = tuple(float(d) for d in doses)
    if not modes or not doses:
        raise AutomatError("need at least one mode and one dose")
    if method not in ("multislice", "fast"):
        raise SimulationError(f"unknown simulation method {method!r}; use 'multislice' or 'fast'")
    src = structures if structures is not None else (structures_path or default_structures_path())
    chosen = pick_structures(src, n, seed, max_atoms=max_atoms)
    out = pathlib.Path(out_dir)
    for sub in ("images", "truth", "cache"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    settings = {"n": n, "modes": list(modes), "doses": list(doses), "seed": seed, "pixel_size_A": pixel_size_A,
                "size": size, "voltage_kV": voltage_kV, "semiangle_mrad": semiangle_mrad, "method": method,
                "max_strain": max_strain, "max_atoms": max_atoms,
                "structures": str(structures_path or ("<atoms>" if structures is not None else default_structures_path()))}
    if method == "multislice":  # the reference simulation's own defaults (slices, box, angles) are part of the set
        from ..imaging.simulate import MULTISLICE_VERSION

        settings["multislice_version"] = MULTISLICE_VERSION
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") != settings:
            raise AutomatError(f"{out} holds a benchmark set generated with other settings; use a new --out")
    entries, images = [], []
    for i, atoms in enumerate(chosen):
        sid = atoms.info["bench_id"]
        plan = _plan(atoms, i, seed, modes, max_strain, 5.0)
        entry = {"id": sid, "material_id": atoms.info.get("material_id"), "formula": reduced_formula(atoms),
                 "tier": atoms.info["tier"], "natoms": len(atoms), "strain": plan["strain"],
                 "energy_per_atom": _float_or_none(atoms.info.get("energy_per_atom")), "truth": f"truth/{sid}.extxyz"}
        entries.append((atoms, entry, plan))
        for mode in modes:
            for d in doses:
                images.append({"file": f"images/{image_name(sid, mode, d)}", "id": sid, "mode": mode, "dose": d,
                               "tier": entry["tier"], "formula": entry["formula"], **plan["modes"][mode]})
    manifest = {"version": MANIFEST_VERSION, "settings": settings, "structures": [e for _, e, _ in entries],
                "images": [{k: v for k, v in im.items() if k != "noise_seed"} for im in images]}
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)

    total = len(images)
    opts = {"out": str(out), "modes": modes, "doses": doses, "method": method, "pixel_size_A": pixel_size_A,
            "size": size, "voltage_kV": voltage_kV, "semiangle_mrad": semiangle_mrad, "seed": seed}
    jobs = [(atoms, entry, plan, opts) for atoms, entry, plan in entries]
    counts = {"done": 0, "written": 0, "skipped": 0, "failed": 0}
    errors = []

    def tick(n_images, label):
        counts["done"] += n_images
        if progress:
            progress(counts["done"], total, label)

    def add(res):
        for key in ("written", "skipped", "failed"):
            counts[key] += res[key]
        errors.extend(res["errors"])

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            add(_write_structure(*job, tick=tick))
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(max_workers=min(int(workers), len(jobs)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_write_structure, *job): job for job in jobs}
            for fut in concurrent.futures.as_completed(futures):
                res = fut.result()
                add(res)
                tick(len(modes) * len(doses), futures[fut][1]["id"])
        errors.sort(key=lambda e: [j[1]["id"] for j in jobs].index(e.split(" ", 1)[0]))  # manifest order
    return GenerateResult(out, len(entries), total, counts["written"], counts["skipped"], counts["failed"],
                          time.perf_counter() - t0, tuple(errors))


def _write_structure(atoms, entry, plan, opts, tick=None) -> dict:
    """Truth file and every (mode, dose) image of one structure; existing files are kept (resume).

    Everything random comes from ``plan`` (seeded by structure index), so the files do not depend on
    which process writes them or in which order. ``tick(n_images, label)`` reports progress.
    """
    from ase.io import write

    from ..imaging.fastsim import render
    from ..imaging.io import save_stem_image
    from ..imaging.microscope import Microscope
    from ..imaging.simulate import multislice_cell_coefficients, simulate_image
    from ..imaging.structures import apply_strain_2d

    out = pathlib.Path(opts["out"])
    modes, doses, method, seed = opts["modes"], opts["doses"], opts["method"], opts["seed"]
    shape = (opts["size"], opts["size"])
    tick = tick or (lambda n, label: None)
    written = skipped = failed = 0
    errors = []
    sid = entry["id"]
    truth = apply_strain_2d(atoms, plan["strain"])
    truth.info = {k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, bool, np.integer, np.floating))}
    truth.info.update(strain=plan["strain"], bench_id=sid, tier=entry["tier"])
    truth.pbc = (True, True, False)
    tpath = out / entry["truth"]
    if not tpath.is_file():
        tmp_t = tpath.with_name(tpath.stem + ".tmp.extxyz")
        write(tmp_t, truth, format="extxyz")
        os.replace(tmp_t, tpath)
    for mode in modes:
        todo = [d for d in doses if not (out / "images" / image_name(sid, mode, d)).is_file()]
        skipped += len(doses) - len(todo)
        if len(doses) > len(todo):
            tick(len(doses) - len(todo), f"{sid} {mode}")
        if not todo:
            continue
        p = plan["modes"][mode]
        m = Microscope(mode=mode, voltage_kV=opts["voltage_kV"], semiangle_mrad=opts["semiangle_mrad"])
        coeffs = None
        try:
            if method == "multislice":
                cpath = out / "cache" / f"{sid}_{mode}.npz"
                if cpath.is_file():
                    coeffs = _load_coeffs(cpath)
                else:
                    coeffs = multislice_cell_coefficients(truth, m)
                    _save_coeffs(cpath, coeffs)
        except AutomatError as exc:
            errors.append(f"{sid} {mode}: {exc}")
            failed += len(todo)
            tick(len(todo), f"{sid} {mode}")
            continue
        for d in todo:
            path = out / "images" / image_name(sid, mode, d)
            # one noise stream per (structure, mode, dose): independent of which files already exist
            rng = np.random.default_rng([p["noise_seed"], int(round(d))])
            meta = {"bench_id": sid, "material_id": entry["material_id"], "formula": entry["formula"],
                    "tier": entry["tier"], "strain": plan["strain"], "truth": entry["truth"], "seed": seed}
            try:
                if coeffs is not None:
                    img = render(coeffs, m, pixel_size_A=opts["pixel_size_A"], shape=shape, rotation_deg=p["rotation_deg"],
                                 offset_A=tuple(p["offset_A"]), dose_e_per_A2=d, rng=rng,
                                 metadata={"strain": plan["strain"], "bench": meta})
                else:
                    img = simulate_image(atoms, m, pixel_size_A=opts["pixel_size_A"], shape=shape,
                                         rotation_deg=p["rotation_deg"], offset_A=tuple(p["offset_A"]),
                                         strain=plan["strain"], method="fast", dose_e_per_A2=d, rng=rng)
                    img = img.replace(metadata={**img.metadata, "bench": meta})
                tmp_i = path.with_name(path.stem + ".tmp.npz")
                save_stem_image(tmp_i, img)
                os.replace(tmp_i, path)
                written += 1
            except AutomatError as exc:
                errors.append(f"{sid} {mode} {d:g}: {exc}")
                failed += 1
            tick(1, f"{sid} {mode} {dose_label(d)}")
    return {"written": written, "skipped": skipped, "failed": failed, "errors": errors}


def _float_or_none(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
