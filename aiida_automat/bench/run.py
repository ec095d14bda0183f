"""Run the pipeline over a benchmark set (``bench.generate``) and score it: ``results.json`` + ``report.md``.

Per image three pipelines run side by side (``bench.pipeline``): the product (retrieval top-k →
reconstruction → verification ranking), ``oracle_template`` (the true unstrained structure as the only
template) and ``automat_baseline`` (blob distance-histogram retrieval, brightness-rank species, flat z).
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
MAE), ``timings`` (median seconds per stage).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import time
from typing import Callable

import numpy as np

from ..errors import AutomatError

__all__ = ["PIPELINES", "RESULT_KEYS", "load_library", "run"]

PIPELINES = ("pipeline", "oracle_template", "automat_baseline")
RESULT_KEYS = ("version", "date", "settings", "options", "library", "rows", "summary", "failures", "energy", "timings")
RESULTS_VERSION = 1


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
    return lib


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


def _stats(rows) -> dict:
    n = len(rows)
    ok = [r for r in rows if r.get("success")]
    rmsd = [r["rmsd_A"] for r in ok if r.get("rmsd_A") is not None]
    lat = [r["lattice_err_pct"] for r in rows if r.get("lattice_err_pct") is not None]
    out = {"n": n, "success": len(ok), "success_rate": len(ok) / n if n else None,
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


def run(bench_dir, *, library=None, exclude_from_library: bool = False, k: int = 5, policy: str = "fixed",
        energy: bool = True, relax: bool = False, potential: str = "chgnet", references_path=None,
        pipelines=PIPELINES, limit: int | None = None, progress: Callable[[int, int, str], None] | None = None,
        write: bool = True) -> dict:
    """Score every image of ``bench_dir``; returns the results dict (also written as results.json/report.md)."""
    from ase.io import read

    from ..imaging.io import load_stem_image
    from ..imaging.structures import reduced_formula
    from ..library.baseline import BlobHistogramBaseline
    from .generate import unstrained
    from .metrics import compare
    from .pipeline import run_baseline, run_oracle, run_pipeline

    if policy != "fixed":
        raise AutomatError(f"policy {policy!r}: the in-process benchmark runs the fixed pipeline only ('fixed'); "
                           "agent policies need the AiiDA WorkChain")
    unknown = set(pipelines) - set(PIPELINES)
    if unknown:
        raise AutomatError(f"unknown pipeline(s) {', '.join(sorted(unknown))}; choose from {', '.join(PIPELINES)}")
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
    truths = {}
    for s in manifest["structures"]:
        p = bench_dir / s["truth"]
        if p.is_file():
            truths[s["id"]] = read(p)

    lib = bl = None
    t = time.perf_counter()
    if "pipeline" in pipelines or "automat_baseline" in pipelines:
        lib = load_library(library, bench_dir, settings, progress)
        if exclude_from_library:
            drop = {str(s.get("material_id")) for s in manifest["structures"]} | {s["id"] for s in manifest["structures"]}
            keep = [i for i, tid in enumerate(lib.ids) if str(tid) not in drop]
            lib = lib.subset(keep)
        if "automat_baseline" in pipelines:
            bl = BlobHistogramBaseline.from_library(lib)
    t_library = time.perf_counter() - t

    en = None
    if energy:
        en = _Energies(potential, references_path)
    calc = en.calculator if (relax and en is not None) else None
    if relax and en is None:
        raise AutomatError("relax=True needs energy=True (the potential)")

    dft_cache, oracle_e = {}, {}
    rows = []
    if write:
        (bench_dir / "rows.partial.jsonl").write_text("")
    for n_done, im in enumerate(images):
        img = load_stem_image(bench_dir / im["file"])
        truth = truths.get(im["id"])
        if truth is None:
            continue
        template = unstrained(truth)
        base = {"file": im["file"], "id": im["id"], "formula": im["formula"], "tier": im["tier"], "mode": im["mode"],
                "dose": float(im["dose"])}
        if en is not None and im["id"] not in dft_cache:
            dft_cache[im["id"]] = en.dft(template)
            true_struct = template
            if relax:
                from ..energy.relax import protocol_settings, relax_2d

                try:
                    true_struct = relax_2d(template, en.calculator, protocol_settings(None), keep_trajectory=False).atoms
                except AutomatError:
                    pass
            oracle_e[im["id"]] = en.ml(true_struct)
        for name in pipelines:
            t = time.perf_counter()
            if name == "pipeline":
                res = run_pipeline(img, lib, k=k, calculator=calc)
            elif name == "oracle_template":
                res = run_oracle(img, template)
            else:
                res = run_baseline(img, lib, bl)
            total = time.perf_counter() - t
            row = dict(base, pipeline=name, template_id=res.template_id, candidates=res.candidate_ids,
                       score=res.score, lattice=res.lattice, error=res.error,
                       timings={**{kk: round(v, 4) for kk, v in res.timings.items()}, "total_s": round(total, 4)})
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
            row["failure"] = _classify(res, truth, match, lib if name != "oracle_template" else None)
            if en is not None and name != "automat_baseline":
                row["eform_dft"] = dft_cache.get(im["id"])
                row["eform_oracle"] = oracle_e.get(im["id"])
                t = time.perf_counter()
                row["eform_ml"] = en.ml(res.atoms) if res.atoms is not None else None
                row["timings"]["energy_s"] = round(time.perf_counter() - t, 4)
            rows.append(row)
            if write:  # a live log (tail -f) of the rows; results.json is written at the end
                with open(bench_dir / "rows.partial.jsonl", "a", encoding="utf8") as fh:
                    fh.write(json.dumps(row, default=_json_default) + "\n")
        if progress:
            progress(n_done + 1, len(images), f"{im['id']} {im['mode']} {int(im['dose'])}")

    summary = {}
    failures = {}
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
    stages = ("lattice_s", "retrieval_s", "reconstruction_s", "verification_s", "relax_s", "energy_s", "total_s")
    timings = {name: {s: float(np.median([r["timings"][s] for r in rows if r["pipeline"] == name and s in r["timings"]]))
                      for s in stages if any(s in r["timings"] for r in rows if r["pipeline"] == name)}
               for name in pipelines}
    timings["library_s"] = t_library
    timings["wall_s"] = time.perf_counter() - t_start
    energy_summary = None
    if en is not None:
        sel = [r for r in rows if r["pipeline"] == "pipeline"] or [r for r in rows if r["pipeline"] == "oracle_template"]
        energy_summary = {"potential": en.info.name, "version": en.info.version, "relaxed": bool(relax),
                          "mu": "MP elemental references (both sides)", "dft": "2DMatPedia energy_per_atom, MP2020-corrected",
                          "overall": _stats(sel), "by_tier": _group(sel, lambda r: r["tier"])}
    results = {
        "version": RESULTS_VERSION,
        "date": datetime.date.today().isoformat(),
        "settings": settings,
        "options": {"library": str(library or "default"), "exclude_from_library": exclude_from_library, "k": k,
                    "policy": policy, "energy": energy, "relax": relax, "potential": potential if energy else None,
                    "pipelines": list(pipelines), "n_images": len(images)},
        "library": None if lib is None else {"name": lib.name, "n_templates": len(lib), "build_key": lib.build_key},
        "rows": rows,
        "summary": summary,
        "failures": failures,
        "energy": energy_summary,
        "timings": timings,
    }
    results = json.loads(json.dumps(results, default=_json_default))
    if write:
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


def report_markdown(results: dict) -> str:
    s, o = results["settings"], results["options"]
    names = [p for p in PIPELINES if p in results["summary"]]
    lines = [f"# Benchmark report ({results['date']})", "",
             f"{o['n_images']} images: modes {', '.join(s['modes'])}, doses {', '.join(f'{d:g}' for d in s['doses'])} e⁻/Å², "
             f"{s['voltage_kV']:g} kV, {s['semiangle_mrad']:g} mrad, {s['pixel_size_A']} Å/px, {s['size']}², "
             f"{s['method']}, ±{100 * s['max_strain']:g} % biaxial strain, random rotation/offset, seed {s['seed']}.",
             f"Library: {results['library']['n_templates'] if results['library'] else '—'} templates"
             f"{' (true structures excluded)' if o['exclude_from_library'] else ''}; top-{o['k']} candidates; "
             f"success = StructureMatcher (ltol 0.2, stol 0.3, angle_tol 5) vs the true strained structure.", ""]

    head = "| | " + " | ".join(f"{n} success" for n in names) + " | pipeline RMSD median (Å) | pipeline lattice err median (%) |"
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
            p = results["summary"].get("pipeline", results["summary"][names[0]])[key].get(kk) or {}
            out.append(f"| {kk} ({n_img}) | " + " | ".join(cells) + f" | {_f(p.get('rmsd_median_A'))} | "
                       f"{_f(p.get('lattice_err_median_pct'), 2)} |")
        return out + [""]

    overall = ["### Overall", "", "| pipeline | n | success | RMSD median / p90 (Å) | lattice err median / max (%) |",
               "|---|---|---|---|---|"]
    for n in names:
        st = results["summary"][n]["overall"]
        overall.append(f"| {n} | {st['n']} | {_pct(st['success_rate'])} | {_f(st['rmsd_median_A'])} / {_f(st['rmsd_p90_A'])} | "
                       f"{_f(st['lattice_err_median_pct'], 2)} / {_f(st['lattice_err_max_pct'], 2)} |")
    lines += overall + [""]
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
    fails = [r for r in results["rows"] if r["pipeline"] == "pipeline" and not r.get("success")]
    if fails:
        lines += ["### Pipeline failures", ""]
        for r in fails:
            lines.append(f"- {r['id']} {r['formula']} ({r['tier']}) {r['mode']} {int(r['dose'])}: {r.get('failure')}"
                         f" — chose {r.get('template_id')} ({r.get('result_formula', '—')})"
                         + (f"; {r['error']}" if r.get("error") else ""))
        lines.append("")
    return "\n".join(lines)
