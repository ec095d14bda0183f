"""Run the pipeline over a benchmark set (``bench.generate``) and score it: ``results.json`` + ``report.md``.

Per image three pipelines run side by side (``bench.pipeline``): the product, ``oracle_template`` (the
true unstrained structure as the only template) and ``automat_baseline`` (blob distance-histogram
retrieval, brightness-rank species, flat z). ``workchain`` is the product run as ``ReconstructionWorkChain``s
on the AiiDA daemon (``bench.daemon_runner``, ``bench run --daemon``) instead of in this process; its
results are scored by the same code as the others. The product's candidate loop is steered by ``policy``:
``rules`` (default) and ``llm`` run the agent policies the WorkChain runs (``bench.agent_loop``), ``fixed``
scores every top-k candidate and keeps the best ranking score (``bench.pipeline.run_pipeline``).
Each output is compared with the true strained structure by ``bench.metrics.compare`` (StructureMatcher
ltol 0.2, stol 0.3, angle_tol 5; projected RMSD; lattice error).

Energies (``energy=True``): formation energy of the product's structure with the ML potential (CHGNet by
default; relaxed first with ``relax=True``) against the DFT formation energy (2DMatPedia
``energy_per_atom`` MP2020-corrected, minus the MP elemental references), next to the "oracle" error of the
same potential on the true (DFT) structure. Both ML sides use the MP elemental references as μ (CHGNet
predicts on the MP2020-corrected scale, on which the uncorrected MP elemental energies are already
consistent), so the two MAEs differ only by the structure.

``results.json`` keys: ``version``, ``date``, ``settings`` (generation), ``options`` (this run),
``library`` (summary), ``rows`` (one per image × pipeline), ``summary`` (per pipeline: ``overall``,
``by_tier``, ``by_mode``, ``by_dose``, ``by_mode_dose``), ``failures`` (per pipeline, counts by type:
lattice / retrieval / selection / reconstruction), ``energy`` (MAE per tier and overall, with the oracle
MAE), ``targets`` (issue #9's targets: value, target, met), ``timings`` (median seconds per stage); after
a written run also ``figures`` (PNG file names, ``bench.plots``).

Parallel runs (``workers`` > 1) score one structure (all its images) per job in spawned processes; each
row depends only on its image and structure, so the rows equal the serial ones (timings aside) and come
back in manifest order.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import time
from typing import Callable

import numpy as np

from ..errors import AutomatError

__all__ = ["DEFAULT_PIPELINES", "PIPELINES", "POLICIES", "RESULT_KEYS", "TARGETS", "load_library", "product_pipeline",
           "run", "run_library"]

#: Every pipeline, in report order; ``workchain`` (the product on the daemon) only when asked for.
PIPELINES = ("pipeline", "workchain", "oracle_template", "automat_baseline")
DEFAULT_PIPELINES = ("pipeline", "oracle_template", "automat_baseline")
RESULT_KEYS = ("version", "date", "settings", "options", "library", "rows", "summary", "failures", "energy", "targets",
               "timings")
RESULTS_VERSION = 2

#: Issue #9's targets for the product pipeline (doses ≥ ``high_dose`` and at ``low_dose``; median time per image,
#: lattice → answer, without / with the relaxation).
TARGETS = {"high_dose": 1e4, "success_high": 0.97, "rmsd_A": 0.02, "eform_gap_meV": 10.0, "low_dose": 3e3,
           "success_low": 0.90, "time_s": 10.0, "time_relax_s": 30.0}


def product_pipeline(names) -> str:
    """The rows the targets, energies and failure list describe: the daemon's when there are any."""
    return "workchain" if "workchain" in names else "pipeline"


def _mp_references_path() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "references" / "mp_elemental_references.json"


def load_library(library, bench_dir: pathlib.Path, settings: dict, progress=None):
    """A ``TemplateLibrary`` for the benchmark optics. ``library``: a TemplateLibrary, ``None``/"default"
    (bundled 2DMatPedia + MC2D), a saved library (.npz), or structure file(s)/folder; built libraries are
    cached in ``bench_dir`` under their build key."""
    from ..library.build import build_key, build_library, library_microscopes
    from ..library.index import TemplateLibrary

    if isinstance(library, TemplateLibrary):
        return library
    if isinstance(library, (str, pathlib.Path)) and str(library).endswith(".npz") and pathlib.Path(library).is_file():
        return TemplateLibrary.load(library)
    structures = None if library in (None, "default", "bundled") else library
    if isinstance(structures, (str, pathlib.Path)) and not pathlib.Path(structures).exists():
        raise FileNotFoundError(f"library {library!r} is neither 'default' nor an existing structure file/folder or .npz")
    mics = library_microscopes(tuple(settings["modes"]), voltage_kV=settings["voltage_kV"],
                               semiangle_mrad=settings["semiangle_mrad"])
    key = build_key(structures, mics)
    path = bench_dir / f"library_{key[:16]}.npz"
    if path.is_file():
        return TemplateLibrary.load(path)
    lib = build_library(structures, name=str(library or "default"), modes=tuple(settings["modes"]),
                        voltage_kV=settings["voltage_kV"], semiangle_mrad=settings["semiangle_mrad"],
                        progress=(lambda d, t: progress(d, t, "library")) if progress else None)
    lib.save(path)
    return TemplateLibrary.load(path)  # what every later run (and a worker, a WorkChain) reads: complex64 descriptors


def run_library(bench_dir):
    """The library a finished ``bench run`` of ``bench_dir`` used (its newest ``library_*.npz``), for the
    offline analyses in ``benchmarks/`` that re-score a run's candidates."""
    from ..library.index import TemplateLibrary

    bench_dir = pathlib.Path(bench_dir)
    files = sorted(bench_dir.glob("library_*.npz"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no library_*.npz in {bench_dir}: run `aiida-automat bench run {bench_dir}` first")
    return TemplateLibrary.load(files[-1])


class _Energies:
    """ML and DFT formation energies, cached per structure."""

    def __init__(self, potential: str, references_path):
        from ..energy.potentials import load_potential
        from ..energy.scale import load_mp_references

        path = pathlib.Path(references_path or _mp_references_path())
        if not path.is_file():
            raise FileNotFoundError(f"MP elemental references not found at {path} (pass references_path)")
        self.mu = load_mp_references(path)
        self.calculator, self.info = load_potential(potential)
        self._cache = {}

    def dft(self, truth) -> float | None:
        from ..energy.formation import formation_energy
        from ..energy.scale import mp2020_correct

        epa = truth.info.get("energy_per_atom")
        if epa is None or not np.isfinite(float(epa)):
            return None
        try:
            corrected = mp2020_correct(truth, float(epa))
            return formation_energy(truth, corrected.corrected_energy_per_atom, self.mu).formation_energy_per_atom
        except (AutomatError, ValueError):
            return None

    def ml(self, atoms) -> float | None:
        from ..energy.formation import formation_energy
        from ..energy.potentials import single_point

        key = (tuple(atoms.numbers), np.round(atoms.positions, 4).tobytes(), np.round(atoms.cell[:], 4).tobytes())
        if key not in self._cache:
            try:
                e = single_point(atoms, self.calculator, stress=False).energy_per_atom
                self._cache[key] = formation_energy(atoms, e, self.mu).formation_energy_per_atom
            except Exception:  # noqa: BLE001 - a broken structure (overlapping atoms) has no energy
                self._cache[key] = None
        return self._cache[key]


def _classify(res, truth, match, library) -> str | None:
    """Failure type of a product result: lattice / retrieval / selection / reconstruction (None: success)."""
    from ..imaging.structures import reduced_formula

    if match is not None and match.success:
        return None
    if res.stage == "lattice":
        return "lattice"
    if res.stage == "retrieval":
        return "retrieval"
    want = reduced_formula(truth)
    tid = truth.info.get("material_id") or truth.info.get("bench_id")

    def right(cid):
        if cid == tid:
            return True
        if library is None:
            return cid == tid
        try:
            return str(library.formulas[library.index_of(cid)]) == want
        except AutomatError:
            return False

    if res.template_id is None:  # every candidate failed to reconstruct
        return "reconstruction" if any(right(c) for c in res.candidate_ids) else "retrieval"
    if right(res.template_id):
        return "reconstruction"
    if any(right(c) for c in res.candidate_ids):
        return "selection"
    return "retrieval"


def _sig4(p):
    """A probability to 4 significant digits: the softmax differs in the 9th digit between a worker and the
    main process (BLAS), which must not make parallel and serial rows differ."""
    return None if p is None else float(f"{p:.4g}")


def _matches(truth, atoms) -> bool:
    from .metrics import compare

    try:
        return bool(compare(truth, atoms).success)
    except Exception:  # noqa: BLE001 - a degenerate alternative simply does not match
        return False


def _stats(rows) -> dict:
    n = len(rows)
    ok = [r for r in rows if r.get("success")]
    rmsd = [r["rmsd_A"] for r in ok if r.get("rmsd_A") is not None]
    lat = [r["lattice_err_pct"] for r in rows if r.get("lattice_err_pct") is not None]
    with_alt = [r for r in rows if r.get("alternatives")]
    out = {"n": n, "success": len(ok), "success_rate": len(ok) / n if n else None,
           # the answer or one of the alternatives it reports (other formulas the image does not rule out)
           "success_or_alternative_rate": (len(ok) + sum(1 for r in rows if not r.get("success")
                                                         and r.get("truth_in_alternatives"))) / n if n else None,
           "with_alternatives_rate": len(with_alt) / n if n else None,
           "rmsd_median_A": float(np.median(rmsd)) if rmsd else None,
           "rmsd_p90_A": float(np.percentile(rmsd, 90)) if rmsd else None,
           "lattice_err_median_pct": float(np.median(lat)) if lat else None,
           "lattice_err_max_pct": float(np.max(lat)) if lat else None}
    e = [abs(r["eform_ml"] - r["eform_dft"]) for r in rows if r.get("eform_ml") is not None and r.get("eform_dft") is not None]
    eo = [abs(r["eform_oracle"] - r["eform_dft"]) for r in rows if r.get("eform_oracle") is not None and r.get("eform_dft") is not None]
    out["eform_mae_meV"] = float(np.mean(e) * 1000) if e else None
    out["eform_n"] = len(e)
    out["eform_oracle_mae_meV"] = float(np.mean(eo) * 1000) if eo else None
    return out


def _group(rows, key) -> dict:
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return {str(k): _stats(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


POLICIES = ("rules", "llm", "fixed")


def _check_policy(policy: str, llm_settings: dict | None):
    """``policy`` → the keyword arguments a worker needs to make the policy object (checked here, once)."""
    if policy not in POLICIES:
        raise AutomatError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if policy != "llm":
        return None
    from ..agent.llm import LLMSettings

    settings = LLMSettings.from_env(**(llm_settings or {}))
    if not settings.base_url and not settings.api_key:
        raise AutomatError("policy 'llm' needs an OpenAI-compatible endpoint: set OPENAI_BASE_URL (e.g. a local "
                           "vLLM/Ollama server) or OPENAI_API_KEY; AUTOMAT_LLM_MODEL picks the model")
    return {"model": settings.model, "base_url": settings.base_url, "api_key": settings.api_key,
            "timeout_s": settings.timeout_s, "max_retries": settings.max_retries}


def _check_optics(lib, settings: dict) -> list[str]:
    """A library without one of the set's modes is refused; other optics only warned about (as retrieve does)."""
    missing = [m for m in settings["modes"] if m not in lib.modes]
    if missing:
        raise AutomatError(f"library {lib.name!r} has no templates for mode(s) {', '.join(missing)} (has "
                           f"{', '.join(lib.modes)}); build one with --modes {','.join(settings['modes'])}")
    warnings = []
    for m in settings["modes"]:
        mic = lib.microscopes[m]
        if abs(mic.voltage_kV - settings["voltage_kV"]) > 1e-6 or abs(mic.semiangle_mrad - settings["semiangle_mrad"]) > 1e-6:
            warnings.append(f"{m}: library optics {mic.voltage_kV:g} kV / {mic.semiangle_mrad:g} mrad differ from the "
                            f"set's {settings['voltage_kV']:g} kV / {settings['semiangle_mrad']:g} mrad")
    return warnings


class _Scorer:
    """Everything one process needs to score images: library, baseline, potential, policy.

    Built once per process (the serial run, or each pool worker) from a picklable context, so a worker
    produces exactly the rows the serial loop would: every row depends only on its image, and the
    per-structure energies (DFT, oracle) are computed inside the job of that structure.
    """

    def __init__(self, ctx: dict):
        from ..library.index import TemplateLibrary

        self.ctx = ctx
        lib = ctx["library"]
        self.lib = TemplateLibrary.from_bytes(lib) if isinstance(lib, bytes) else lib
        self.baseline = ctx["baseline"]
        self.en = _Energies(ctx["potential"], ctx["references_path"]) if ctx["energy"] else None
        self.calc = self.en.calculator if (ctx["relax"] and self.en is not None) else None
        self.policy = None
        self.denoiser = None
        if ctx["policy"] != "fixed" and ctx.get("denoiser", True):
            from ..denoise import load_model

            self.denoiser = load_model()  # the bundled checkpoint, as the WorkChain's protocols give
        if ctx["policy"] == "rules":
            from ..agent.rules import RulesPolicy

            self.policy = RulesPolicy()
        elif ctx["policy"] == "llm":
            from ..agent.llm import LLMPolicy, LLMSettings

            self.policy = LLMPolicy(LLMSettings(**ctx["llm"]))

    def _structure_energies(self, template):
        """(DFT, ML-on-the-true-structure) formation energies of one structure."""
        if self.en is None:
            return None, None
        true_struct = template
        if self.calc is not None:
            from ..energy.relax import protocol_settings, relax_2d

            try:
                true_struct = relax_2d(template, self.calc, protocol_settings(None), keep_trajectory=False).atoms
            except AutomatError:
                pass
        return self.en.dft(template), self.en.ml(true_struct)

    def _one(self, name, img, template, file):
        from .pipeline import run_baseline, run_oracle, run_pipeline

        k = self.ctx["k"]
        if name == "workchain":  # already run by the daemon (bench.daemon_runner)
            return self.ctx["workchain"][file]
        if name == "oracle_template":
            return run_oracle(img, template)
        if name == "automat_baseline":
            return run_baseline(img, self.lib, self.baseline)
        if self.policy is None:
            return run_pipeline(img, self.lib, k=k, calculator=self.calc)
        from .agent_loop import run_agent

        return run_agent(img, self.lib, self.policy, k=k, calculator=self.calc, denoiser=self.denoiser)

    def score(self, job) -> list[dict]:
        """Rows (one per image × pipeline) of one structure's images."""
        from ase.io import read

        from ..imaging.io import load_stem_image
        from ..imaging.structures import reduced_formula
        from .generate import unstrained
        from .metrics import compare
        from .pipeline import PipelineResult

        bench_dir = pathlib.Path(self.ctx["bench_dir"])
        sid, truth_file, images = job
        truth = read(bench_dir / truth_file)
        template = unstrained(truth)
        e_dft, e_oracle = self._structure_energies(template)
        rows = []
        for im in images:
            img = load_stem_image(bench_dir / im["file"])
            base = {"file": im["file"], "id": im["id"], "formula": im["formula"], "tier": im["tier"], "mode": im["mode"],
                    "dose": float(im["dose"])}
            for name in self.ctx["pipelines"]:
                t = time.perf_counter()
                try:
                    res = self._one(name, img, template, im["file"])
                except Exception as exc:  # noqa: BLE001 - a bug costs its row (error listed in the report), not the run
                    res = PipelineResult(error=f"unexpected {type(exc).__name__}: {exc}")
                total = res.timings.get("total_s", time.perf_counter() - t)
                row = dict(base, pipeline=name, template_id=res.template_id, candidates=res.candidate_ids,
                           score=res.score, lattice=res.lattice, error=res.error,
                           timings={**{kk: round(v, 4) for kk, v in res.timings.items()}, "total_s": round(total, 4)})
                if name == "workchain":
                    row["process_pk"] = self.ctx["workchain_pks"][im["file"]]
                if res.trace:
                    row["trace"] = list(res.trace)
                if res.scores:  # per candidate: verification (ranking) score or error, and retrieval probability
                    row["candidate_scores"] = {tid: {**v, "retrieval_p": _sig4(res.retrieval_p.get(tid))}
                                               for tid, v in res.scores.items()}
                match = None
                if res.atoms is not None:
                    try:
                        match = compare(truth, res.atoms)
                        row.update(success=match.success, rmsd_A=match.projected_rmsd_A,
                                   lattice_err_pct=match.lattice_error_pct, formula_ok=match.formula_ok,
                                   result_formula=reduced_formula(res.atoms))
                    except Exception as exc:  # noqa: BLE001 - a degenerate output is a failure, not a crash
                        row.update(success=False, error=f"compare: {type(exc).__name__}: {exc}")
                else:
                    row["success"] = False
                if res.alternatives:
                    row["alternatives"] = list(res.alternatives)
                    row["truth_in_alternatives"] = any(_matches(truth, a) for a in res.alternatives.values())
                row["failure"] = _classify(res, truth, match, self.lib if name != "oracle_template" else None)
                if self.en is not None and name != "automat_baseline":
                    row["eform_dft"], row["eform_oracle"] = e_dft, e_oracle
                    t = time.perf_counter()
                    row["eform_ml"] = self.en.ml(res.atoms) if res.atoms is not None else None
                    row["timings"]["energy_s"] = round(time.perf_counter() - t, 4)
                rows.append(json.loads(json.dumps(row, default=_json_default)))
        return rows


_WORKER: _Scorer | None = None


def _init_worker(ctx: dict) -> None:
    global _WORKER
    _WORKER = _Scorer(ctx)


def _score_in_worker(job) -> list[dict]:
    return _WORKER.score(job)


def _jobs(images, structures: dict) -> list[tuple]:
    """One job per structure (its images in manifest order), in order of first appearance."""
    jobs = {}
    for im in images:
        if im["id"] in structures:
            jobs.setdefault(im["id"], []).append(im)
    return [(sid, structures[sid], ims) for sid, ims in jobs.items()]


def _score_all(jobs, ctx: dict, workers: int, on_rows: Callable[[list, tuple], None]) -> list[dict]:
    """Rows of every job in job order; ``workers`` > 1: a pool of spawned processes (no fork: torch threads)."""
    if workers <= 1 or len(jobs) <= 1:
        scorer = _Scorer(ctx)
        out = []
        for job in jobs:
            rows = scorer.score(job)
            on_rows(rows, job)
            out.append(rows)
        return [r for rows in out for r in rows]
    import concurrent.futures
    import multiprocessing

    results = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                                mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(ctx,)) as pool:
        futures = {pool.submit(_score_in_worker, job): i for i, job in enumerate(jobs)}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            on_rows(results[i], jobs[i])
    return [r for rows in results for r in rows]


def _summaries(rows, pipelines):
    summary, failures = {}, {}
    for name in pipelines:
        sel = [r for r in rows if r["pipeline"] == name]
        summary[name] = {
            "overall": _stats(sel),
            "by_tier": _group(sel, lambda r: r["tier"]),
            "by_mode": _group(sel, lambda r: r["mode"]),
            "by_dose": _group(sel, lambda r: int(r["dose"])),
            "by_mode_dose": _group(sel, lambda r: f"{r['mode']} {int(r['dose'])}"),
        }
        counts = {}
        for r in sel:
            if r.get("failure"):
                counts[r["failure"]] = counts.get(r["failure"], 0) + 1
        failures[name] = counts
    return summary, failures


def _targets(rows, relax: bool, product: str = "pipeline") -> dict | None:
    """Issue #9's targets for the product pipeline, each with the measured value and whether it is met."""
    sel = [r for r in rows if r["pipeline"] == product]
    if not sel:
        return None
    high = _stats([r for r in sel if r["dose"] >= TARGETS["high_dose"]])
    low = _stats([r for r in sel if r["dose"] == TARGETS["low_dose"]])
    times = [r["timings"]["total_s"] for r in sel]
    out = {}
    if high["n"]:
        out["success_high_dose"] = {"value": high["success_rate"], "target": TARGETS["success_high"], "op": ">="}
        out["rmsd_median_high_dose_A"] = {"value": high["rmsd_median_A"], "target": TARGETS["rmsd_A"], "op": "<="}
        if high["eform_mae_meV"] is not None and high["eform_oracle_mae_meV"] is not None:
            out["eform_mae_minus_oracle_meV"] = {"value": high["eform_mae_meV"] - high["eform_oracle_mae_meV"],
                                                 "target": TARGETS["eform_gap_meV"], "op": "<="}
    if low["n"]:
        out["success_low_dose"] = {"value": low["success_rate"], "target": TARGETS["success_low"], "op": ">="}
    out["time_median_s"] = {"value": float(np.median(times)), "target": TARGETS["time_relax_s" if relax else "time_s"],
                            "op": "<="}
    for t in out.values():
        v = t["value"]
        t["met"] = None if v is None else bool(v >= t["target"] if t["op"] == ">=" else v <= t["target"])
    return out


def run(bench_dir, *, library=None, exclude_from_library: bool = False, k: int = 5, policy: str = "rules",
        energy: bool = True, relax: bool = False, potential: str = "chgnet", references_path=None,
        pipelines=DEFAULT_PIPELINES, limit: int | None = None, workers: int = 1, llm_settings: dict | None = None,
        plots: bool = True, progress: Callable[[int, int, str], None] | None = None, write: bool = True,
        denoiser: bool = True) -> dict:
    """Score every image of ``bench_dir``; returns the results dict (also written as results.json/report.md
    and, with ``plots``, the PNG figures of ``bench.plots``). ``workers`` > 1 scores structures in parallel
    processes; the rows are the same as with one (only the timings differ). ``workchain`` in ``pipelines``:
    submit the images to the AiiDA daemon first (``bench.daemon_runner``; needs a loaded or default profile
    with a running daemon) and wait for them. ``denoiser``: the agent policies may denoise an image whose raw
    lattice is not found, with the bundled checkpoint (as the WorkChain's protocols)."""
    from ..library.baseline import BlobHistogramBaseline

    llm = _check_policy(policy, llm_settings)
    unknown = set(pipelines) - set(PIPELINES)
    if unknown:
        raise AutomatError(f"unknown pipeline(s) {', '.join(sorted(unknown))}; choose from {', '.join(PIPELINES)}")
    if relax and not energy:
        raise AutomatError("relax=True needs energy=True (the potential)")
    if int(workers) < 1:
        raise AutomatError(f"workers must be ≥ 1, not {workers}")
    if "workchain" in pipelines and policy == "fixed":
        raise AutomatError("the WorkChain runs an agent policy: use --policy rules or llm with the daemon")
    t_start = time.perf_counter()
    bench_dir = pathlib.Path(bench_dir)
    mpath = bench_dir / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} not found: generate the set first (aiida-automat bench generate)")
    manifest = json.loads(mpath.read_text())
    settings = manifest["settings"]
    images = [im for im in manifest["images"] if (bench_dir / im["file"]).is_file()]
    if limit:
        images = images[:limit]
    if not images:
        raise AutomatError(f"no images in {bench_dir}/images: generation has not run or failed")
    structures = {s["id"]: s["truth"] for s in manifest["structures"] if (bench_dir / s["truth"]).is_file()}
    jobs = _jobs(images, structures)

    lib = bl = None
    lib_warnings = []
    if "workchain" in pipelines:  # no daemon: say so now, not after a library build
        from .daemon_runner import preflight

        preflight(bench_dir)
    t = time.perf_counter()
    if {"pipeline", "workchain", "automat_baseline"} & set(pipelines):
        lib = load_library(library, bench_dir, settings, progress)
        lib_warnings = _check_optics(lib, settings)
        if exclude_from_library:
            drop = {str(s.get("material_id")) for s in manifest["structures"]} | {s["id"] for s in manifest["structures"]}
            keep = [i for i, tid in enumerate(lib.ids) if str(tid) not in drop]
            lib = lib.subset(keep)  # its key names the kept ids: the stored library node (--daemon) is found by it
        if "automat_baseline" in pipelines:
            bl = BlobHistogramBaseline.from_library(lib)
    t_library = time.perf_counter() - t
    potential_id = None
    if energy:  # fail here, once, rather than in every worker
        from ..energy.potentials import resolve_checkpoint

        path = pathlib.Path(references_path or _mp_references_path())
        if not path.is_file():
            raise FileNotFoundError(f"MP elemental references not found at {path} (pass references_path)")
        potential_id = resolve_checkpoint(potential)[:2]

    wc_results = {}
    if "workchain" in pipelines:
        from .daemon_runner import run_workchains

        wc_results = run_workchains(bench_dir, images, lib, k=k, policy=policy, llm=llm, relax=relax,
                                    potential=potential, progress=progress)
    workers = int(workers)
    ctx = {"bench_dir": str(bench_dir), "library": lib.to_bytes() if (lib is not None and workers > 1) else lib,
           "baseline": bl, "energy": energy, "relax": relax, "potential": potential,
           "references_path": None if references_path is None else str(references_path), "k": k,
           "policy": policy, "llm": llm, "pipelines": tuple(pipelines), "denoiser": bool(denoiser),
           "workchain": {f: res for f, (_, res) in wc_results.items()},
           "workchain_pks": {f: pk for f, (pk, _) in wc_results.items()}}
    partial = bench_dir / "rows.partial.jsonl"
    if write:
        partial.write_text("")
    state = {"done": 0}

    def on_rows(rows, job):
        if write:  # a live log (tail -f) of the rows, in completion order; results.json is written at the end
            with open(partial, "a", encoding="utf8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        state["done"] += len(job[2])
        if progress:
            progress(state["done"], sum(len(j[2]) for j in jobs), job[0])

    rows = _score_all(jobs, ctx, workers, on_rows)
    summary, failures = _summaries(rows, pipelines)
    stages = ("lattice_s", "retrieval_s", "reconstruction_s", "verification_s", "relax_s", "energy_s", "total_s")
    timings = {name: {s: float(np.median([r["timings"][s] for r in rows if r["pipeline"] == name and s in r["timings"]]))
                      for s in stages if any(s in r["timings"] for r in rows if r["pipeline"] == name)}
               for name in pipelines}
    timings["library_s"] = t_library
    if wc_results:
        from .daemon_runner import daemon_span

        timings["daemon"] = daemon_span([pk for pk, _ in wc_results.values()])
    timings["wall_s"] = time.perf_counter() - t_start
    energy_summary = None
    product = product_pipeline(pipelines)
    if energy:
        sel = [r for r in rows if r["pipeline"] == product] or [r for r in rows if r["pipeline"] == "oracle_template"]
        energy_summary = {"potential": potential_id[0], "version": potential_id[1], "relaxed": bool(relax),
                          "mu": "MP elemental references (both sides)", "dft": "2DMatPedia energy_per_atom, MP2020-corrected",
                          "overall": _stats(sel), "by_tier": _group(sel, lambda r: r["tier"])}
    lib_label = str(library) if isinstance(library, (str, pathlib.Path)) or library is None else None
    results = {
        "version": RESULTS_VERSION,
        "date": datetime.date.today().isoformat(),
        "settings": settings,
        "options": {"library": lib_label or (lib.name if lib is not None else None) or "default",
                    "exclude_from_library": exclude_from_library, "k": k, "policy": policy, "denoiser": bool(denoiser),
                    "llm_model": llm["model"] if llm else None, "energy": energy, "relax": relax,
                    "potential": potential if energy else None, "pipelines": list(pipelines), "n_images": len(images),
                    "workers": workers, "daemon": "workchain" in pipelines},
        "library": None if lib is None else {"name": lib.name, "n_templates": len(lib), "build_key": lib.build_key,
                                             "warnings": lib_warnings},
        "rows": rows,
        "summary": summary,
        "failures": failures,
        "energy": energy_summary,
        "targets": _targets(rows, relax, product),
        "timings": timings,
    }
    results = json.loads(json.dumps(results, default=_json_default))
    if write:
        figures = {}
        if plots:
            from .plots import write_plots

            figures = write_plots(results, bench_dir)
        results["figures"] = figures
        (bench_dir / "results.json").write_text(json.dumps(results, indent=1))
        (bench_dir / "report.md").write_text(report_markdown(results))
    return results


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    return str(o)


def _pct(x):
    return "—" if x is None else f"{100 * x:.0f} %"


def _f(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


_POLICY_TEXT = {"rules": "agent rules policy", "llm": "agent LLM policy (rules fallback)",
                "fixed": "fixed (every top-k candidate scored, best ranking score)"}
_TARGET_TEXT = {
    "success_high_dose": ("success, doses ≥ 10⁴", _pct),
    "rmsd_median_high_dose_A": ("projected RMSD median (Å), doses ≥ 10⁴", _f),
    "eform_mae_minus_oracle_meV": ("E_form MAE − oracle MAE (meV/atom), doses ≥ 10⁴", lambda x: _f(x, 0)),
    "success_low_dose": ("success, dose 3·10³", _pct),
    "time_median_s": ("median time per image (s)", lambda x: _f(x, 1)),
}


def report_markdown(results: dict) -> str:
    s, o = results["settings"], results["options"]
    names = [p for p in PIPELINES if p in results["summary"]]
    product = product_pipeline(names)
    lines = [f"# Benchmark report ({results['date']})", "",
             f"{o['n_images']} images: modes {', '.join(s['modes'])}, doses {', '.join(f'{d:g}' for d in s['doses'])} e⁻/Å², "
             f"{s['voltage_kV']:g} kV, {s['semiangle_mrad']:g} mrad, {s['pixel_size_A']} Å/px, {s['size']}², "
             f"{s['method']}, ±{100 * s['max_strain']:g} % biaxial strain, random rotation/offset, seed {s['seed']}.",
             f"Library: {o['library']}, {results['library']['n_templates'] if results['library'] else '—'} templates"
             f"{' (true structures excluded)' if o['exclude_from_library'] else ''}; top-{o['k']} candidates; "
             f"candidate loop: {_POLICY_TEXT.get(o.get('policy', 'fixed'), o.get('policy'))}"
             f"{' (' + o['llm_model'] + ')' if o.get('llm_model') else ''}; "
             f"success = StructureMatcher (ltol 0.2, stol 0.3, angle_tol 5) vs the true strained structure.", ""]
    if "workchain" in names:
        d = results["timings"].get("daemon") or {}
        lines += ["workchain: the product as `ReconstructionWorkChain`s (protocol moderate) on the AiiDA daemon "
                  f"(process pks in results.json): {d.get('n_workchains')} WorkChains from first creation to last "
                  f"finish in {_f(d.get('span_s'), 0)} s, {_f(d.get('images_per_min'), 1)} images/min. Its times per "
                  "stage are the WorkChain's steps summed, which include other images' steps whenever a worker runs "
                  "several WorkChains at once.", ""]
    for w in (results.get("library") or {}).get("warnings", []):
        lines += [f"Warning: {w}.", ""]
    if results.get("targets"):
        lines += [f"### Targets (issue #9, {product})", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for key, t in results["targets"].items():
            label, fmt = _TARGET_TEXT[key]
            lines.append(f"| {label} | {fmt(t['value'])} | {t['op']} {fmt(t['target'])} | "
                         f"{'—' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
        lines.append("")
    if results.get("figures"):
        lines += ["### Plots", ""] + [f"![{cap}]({name})" for name, cap in results["figures"].items()] + [""]

    lead = product if product in names else names[0]
    head = "| | " + " | ".join(f"{n} success" for n in names) + f" | {lead} RMSD median (Å) | {lead} lattice err median (%) |"
    sep = "|---" * (len(names) + 3) + "|"

    def table(title, key):
        keys = sorted({k for n in names for k in results["summary"][n][key]},
                      key=lambda x: (x.split()[0], float(x.split()[-1])) if x.split()[-1].replace(".", "").isdigit() else (x, 0))
        out = [f"### {title}", "", head.replace("| |", f"| {key[3:]} (n) |"), sep]
        for kk in keys:
            cells = []
            n_img = None
            for n in names:
                st = results["summary"][n][key].get(kk)
                cells.append(_pct(st["success_rate"]) if st else "—")
                n_img = n_img or (st["n"] if st else None)
            p = results["summary"][lead][key].get(kk) or {}
            out.append(f"| {kk} ({n_img}) | " + " | ".join(cells) + f" | {_f(p.get('rmsd_median_A'))} | "
                       f"{_f(p.get('lattice_err_median_pct'), 2)} |")
        return out + [""]

    overall = ["### Overall", "", "| pipeline | n | success | answer or a reported alternative | images with alternatives "
               "| RMSD median / p90 (Å) | lattice err median / max (%) |", "|---|---|---|---|---|---|---|"]
    for n in names:
        st = results["summary"][n]["overall"]
        overall.append(f"| {n} | {st['n']} | {_pct(st['success_rate'])} | {_pct(st.get('success_or_alternative_rate'))} | "
                       f"{_pct(st.get('with_alternatives_rate'))} | {_f(st['rmsd_median_A'])} / {_f(st['rmsd_p90_A'])} | "
                       f"{_f(st['lattice_err_median_pct'], 2)} / {_f(st['lattice_err_max_pct'], 2)} |")
    lines += overall + ["", "Alternatives: verified reconstructions of other formulas within 0.005 of the answer's "
                        "verification score (`AgentState.alternatives`), reported to the user in result.json.", ""]
    lines += table("By tier", "by_tier") + table("By mode and dose", "by_mode_dose")
    if results.get("energy"):
        e = results["energy"]
        lines += [f"### Formation energy ({e['potential']} {e['version']}{', relaxed' if e['relaxed'] else ', single point'}; "
                  f"DFT: {e['dft']}; μ: {e['mu']})", "",
                  "| tier | n | MAE pipeline structure (meV/atom) | MAE true structure (oracle, meV/atom) |", "|---|---|---|---|"]
        for kk, st in list(e["by_tier"].items()) + [("all", e["overall"])]:
            lines.append(f"| {kk} | {st['eform_n']} | {_f(st['eform_mae_meV'], 0)} | {_f(st['eform_oracle_mae_meV'], 0)} |")
        lines.append("")
    lines += ["### Failures by type", "", "| pipeline | lattice | retrieval | selection | reconstruction |", "|---|---|---|---|---|"]
    for n in names:
        f = results["failures"].get(n, {})
        lines.append(f"| {n} | " + " | ".join(str(f.get(t, 0)) for t in ("lattice", "retrieval", "selection", "reconstruction")) + " |")
    lines += ["", "lattice: no lattice measured; retrieval: no right-formula template among the candidates; selection: one was, "
              "another ranked higher; reconstruction: the right template was chosen but the structure does not match.", "",
              "### Median time per stage (s)", "", "| pipeline | " + " | ".join(
                  ("lattice", "retrieval", "reconstruction", "verification", "energy", "total")) + " |", "|---" * 7 + "|"]
    for n in names:
        t = results["timings"].get(n, {})
        lines.append(f"| {n} | " + " | ".join(_f(t.get(s), 2) for s in
                                              ("lattice_s", "retrieval_s", "reconstruction_s", "verification_s", "energy_s", "total_s")) + " |")
    lines += ["", f"Library build/load {results['timings']['library_s']:.1f} s; wall time {results['timings']['wall_s']:.0f} s.", ""]
    fails = [r for r in results["rows"] if r["pipeline"] == product and not r.get("success")]
    if fails:
        lines += [f"### {product.capitalize()} failures", ""]
        for r in fails:
            lines.append(f"- {r['id']} {r['formula']} ({r['tier']}) {r['mode']} {int(r['dose'])}: {r.get('failure')}"
                         f" — chose {r.get('template_id')} ({r.get('result_formula', '—')})"
                         + (f"; {r['error']}" if r.get("error") else ""))
        lines.append("")
    return "\n".join(lines)
