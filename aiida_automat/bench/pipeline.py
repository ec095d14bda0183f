"""The core pipeline in one process, without AiiDA (for benchmarks): image → lattice → candidates →
reconstruction → verification → best structure (→ optional relaxation).

The ranking score is the one ``calculations.functions.verify_candidate`` computes
(``reconstruct.scoring.candidate_score``: verification NCC minus the strain and absolute-contrast
penalties). Three pipelines share that scoring:

* ``run_pipeline``: the product — ``library.retrieve`` top-k, every candidate reconstructed and scored;
* ``run_oracle``: the true (unstrained) structure as the only template (isolates reconstruction);
* ``run_baseline``: AutoMat-style — blob distance-histogram retrieval (``library.baseline``), the top-1
  template registered, species re-assigned by column brightness rank (heaviest column content to the
  brightest column), all atoms flattened onto one plane.

Retrieval runs with ``propose_outside=False``: the element proposal for an image that no template fits is
a hint for the user (the ``prototype``), never a candidate, and costs up to ~15 s per such image.

``bench.agent_loop.run_agent`` takes the same steps (``reconstruct_candidate``, ``score_candidate``) in the
order an agent policy chooses, so a policy and ``run_pipeline`` differ only in that order and stopping rule.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import AutomatError

__all__ = ["PipelineResult", "ranking_score", "reconstruct_candidate", "run_baseline", "run_oracle", "run_pipeline",
           "score_candidate"]


@dataclass
class PipelineResult:
    atoms: object | None = None  # ase.Atoms of the chosen structure (None: failed)
    template_id: str | None = None
    candidate_ids: list = field(default_factory=list)  # retrieved, in retrieval order
    score: float | None = None  # ranking score of the chosen candidate
    scores: dict = field(default_factory=dict)  # template id -> ranking score (or error)
    lattice: dict | None = None  # measured a, b, gamma (nominal calibration)
    stage: str | None = None  # where it failed: lattice / retrieval / reconstruction
    error: str | None = None
    timings: dict = field(default_factory=dict)
    relaxed: bool = False
    trace: list = field(default_factory=list)  # agent policies: one "action {args} [policy]" per step
    retrieval_p: dict = field(default_factory=dict)  # template id -> retrieval probability
    alternatives: dict = field(default_factory=dict)  # agent policies: template id -> ase.Atoms the image does not rule out


def ranking_score(image, lattice_vectors_px, rec) -> dict:
    """``verify_candidate``'s score for reconstruction ``rec`` (the same function, ``candidate_score``)."""
    from ..reconstruct.scoring import candidate_score

    strain = float(abs(np.trace(np.asarray(rec.built.strain, dtype=float)) / 2.0))
    return candidate_score(image, lattice_vectors_px, rec.atoms, strain)


def _lattice_dict(lat) -> dict:
    return {"a": float(lat.a_A), "b": float(lat.b_A), "gamma": float(lat.gamma_deg)}


def _measure(image, result: PipelineResult):
    from ..lattice.measure import measure_lattice

    t = time.perf_counter()
    try:
        lat = measure_lattice(image)
    except AutomatError as exc:
        result.stage, result.error = "lattice", f"{type(exc).__name__}: {exc}"
        return None
    finally:
        result.timings["lattice_s"] = time.perf_counter() - t
    result.lattice = _lattice_dict(lat)
    return lat


CANDIDATE_ERRORS = (AutomatError, np.linalg.LinAlgError, ValueError)


def reconstruct_candidate(image, lat, atoms, result: PipelineResult, tid: str, reconstruct_kw=None):
    """``reconstruct`` one template; its time goes to ``reconstruction_s``, a failure to ``result.scores``."""
    from ..reconstruct.pipeline import reconstruct

    t = time.perf_counter()
    try:
        return reconstruct(image, atoms, lat.vectors_px, **(reconstruct_kw or {}))
    except CANDIDATE_ERRORS as exc:
        result.scores[tid] = {"error": f"{type(exc).__name__}: {exc}"}
        return None
    finally:
        result.timings["reconstruction_s"] = result.timings.get("reconstruction_s", 0.0) + time.perf_counter() - t


def score_candidate(image, lat, rec, result: PipelineResult, tid: str) -> float | None:
    """``ranking_score`` of one reconstruction, recorded in ``result.scores`` (time: ``verification_s``)."""
    t = time.perf_counter()
    try:
        s = ranking_score(image, lat.vectors_px, rec)
    except CANDIDATE_ERRORS as exc:
        result.scores[tid] = {"error": f"verification: {type(exc).__name__}: {exc}"}
        return None
    finally:
        result.timings["verification_s"] = result.timings.get("verification_s", 0.0) + time.perf_counter() - t
    # the rows keep what offline re-choosing needs (benchmarks/selection.py, benchmarks/contrast_selection.py)
    result.scores[tid] = {k: round(float(s[k]), 6) for k in ("ranking_score", "score", "size_neutral_score", "contrast",
                                                             "contrast_penalty", "strain_penalty")}
    return s["ranking_score"]


def _last_error(result: PipelineResult) -> str | None:
    errors = [v["error"] for v in result.scores.values() if "error" in v]
    return errors[-1] if errors else None


def _score_candidates(image, lat, templates, result: PipelineResult, reconstruct_kw=None) -> None:
    """Reconstruct and score each (id, atoms); keep the best ranking score in ``result``."""
    best = None
    result.timings.setdefault("reconstruction_s", 0.0)
    result.timings.setdefault("verification_s", 0.0)
    for tid, atoms in templates:
        rec = reconstruct_candidate(image, lat, atoms, result, tid, reconstruct_kw)
        if rec is None:
            continue
        s = score_candidate(image, lat, rec, result, tid)
        if s is not None and (best is None or s > best[0]):
            best = (s, tid, rec)
    if best is None:
        result.stage = "reconstruction"
        result.error = _last_error(result) or "no candidate could be reconstructed"
        return
    result.score, result.template_id, rec = best
    result.atoms = rec.atoms


def _relax(result: PipelineResult, calculator) -> None:
    if calculator is None or result.atoms is None:
        return
    from ..energy.relax import protocol_settings, relax_2d

    t = time.perf_counter()
    try:
        rel = relax_2d(result.atoms, calculator, protocol_settings(None), keep_trajectory=False)
        result.atoms = rel.atoms
        result.relaxed = True
    except AutomatError as exc:
        result.error = f"relaxation: {exc}"
    result.timings["relax_s"] = time.perf_counter() - t


def _timed_retrieval(result: PipelineResult, errors, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` timed into ``result.timings["retrieval_s"]``; ``errors`` become a retrieval
    failure recorded in ``result`` (and None returned)."""
    t = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except errors as exc:
        result.stage, result.error = "retrieval", f"{type(exc).__name__}: {exc}"
        return None
    finally:
        result.timings["retrieval_s"] = time.perf_counter() - t


def run_pipeline(image, library, *, k: int = 5, calculator=None, reconstruct_kw=None) -> PipelineResult:
    """The product pipeline on one image with a ``TemplateLibrary``; ``calculator`` set ⇒ relax the result."""
    from ..library.retrieve import retrieve

    result = PipelineResult()
    lat = _measure(image, result)
    if lat is None:
        return result
    ret = _timed_retrieval(result, AutomatError, retrieve, image, library, lattice=lat, k=k, propose_outside=False)
    if ret is None:
        return result
    cands = [c for c in ret.candidates if not c.outside_library]
    result.candidate_ids = [c.template_id for c in cands]
    if not cands:
        result.stage, result.error = "retrieval", "no candidate in the library"
        return result
    _score_candidates(image, lat, [(c.template_id, library.atoms(c.index)) for c in cands], result, reconstruct_kw)
    _relax(result, calculator)
    return result


def run_oracle(image, template, *, calculator=None, reconstruct_kw=None) -> PipelineResult:
    """Reconstruction with the true structure as the only template."""
    result = PipelineResult()
    lat = _measure(image, result)
    if lat is None:
        return result
    tid = str(template.info.get("bench_id") or template.info.get("material_id") or "truth")
    result.candidate_ids = [tid]
    _score_candidates(image, lat, [(tid, template)], result, reconstruct_kw)
    _relax(result, calculator)
    return result


def brightness_rank_species(rec, pixel_size_A):
    """AutoMat-style species and heights for reconstruction ``rec``: the template's column contents are
    handed out by brightness rank (heaviest total Z to the brightest observed column), and every atom is
    put on one plane (z = mean height). Returns ase.Atoms."""
    from ase.data import atomic_numbers

    from ..reconstruct.build import build_structure
    from ..reconstruct.motif import Column

    reg, cell = rec.registration, rec.cell
    columns = reg.motif.columns
    brightness = np.asarray(cell.synthesize(np.asarray(reg.frac, dtype=float)), dtype=float)
    weight = np.array([sum(atomic_numbers[s] for s in c.symbols) for c in columns], dtype=float)
    by_bright = np.argsort(-brightness, kind="stable")
    by_weight = np.argsort(-weight, kind="stable")
    new = list(columns)
    for col_i, content_i in zip(by_bright, by_weight):
        src = columns[content_i]
        new[col_i] = Column(columns[col_i].frac, src.symbols, src.z_A)
    motif = dataclasses.replace(reg.motif, columns=tuple(new))
    reg2 = dataclasses.replace(reg, motif=motif)
    px = np.asarray(pixel_size_A, dtype=float)
    built = build_structure(reg2, np.asarray(cell.vectors_px, dtype=float) * px[None, :], symmetrize=False)
    atoms = built.atoms.copy()
    pos = atoms.positions.copy()
    pos[:, 2] = float(pos[:, 2].mean())
    atoms.positions = pos
    return atoms


def run_baseline(image, library, baseline, *, k: int = 1) -> PipelineResult:
    """AutoMat-style pipeline: ``baseline`` is a ``library.baseline.BlobHistogramBaseline`` of ``library``."""
    from ..reconstruct.pipeline import reconstruct

    result = PipelineResult()
    lat = _measure(image, result)
    if lat is None:
        return result
    # any exception (no blobs etc.) is a retrieval failure of the baseline
    ranked = _timed_retrieval(result, Exception, baseline.rank, image, k=k)
    if ranked is None:
        return result
    result.candidate_ids = [str(library.ids[i]) for i in ranked]
    t = time.perf_counter()
    for i in ranked:
        tid = str(library.ids[i])
        try:
            rec = reconstruct(image, library.atoms(i), lat.vectors_px, symmetrize=False)
            result.atoms = brightness_rank_species(rec, image.pixel_size_A)
            result.template_id = tid
            break
        except (AutomatError, np.linalg.LinAlgError, ValueError) as exc:
            result.scores[tid] = {"error": f"{type(exc).__name__}: {exc}"}
            result.stage, result.error = "reconstruction", f"{type(exc).__name__}: {exc}"
    if result.atoms is not None:
        result.stage = result.error = None
    result.timings["reconstruction_s"] = time.perf_counter() - t
    return result
