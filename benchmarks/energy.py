"""Oracle error of the energy stage: ML formation energies vs DFT on 2DMatPedia monolayers.

For a seeded random subset of 2DMatPedia structures (≤ --max-atoms atoms) each potential computes

* a single point on the DFT geometry, and
* a 2D relaxation (positions + in-plane cell, protocol --protocol) from the DFT geometry,

and the formation energy E/atom − Σ xᵢ μᵢ with μᵢ computed by the same potential on the elemental
reference structures of ``aiida_automat.energy.references``. The DFT side is 2DMatPedia's
``energy_per_atom`` put on the MP2020-corrected scale (pymatgen ``MaterialsProject2020Compatibility``)
minus the MP elemental references (``mp_elemental_references.json``, no correction needed).
Also printed: the same error with the DFT μ on the ML side (isolates the error of the ML references) and
the error against the *uncorrected* DFT (shows what a scale mistake costs).

    nice -n 10 python benchmarks/energy.py --potential chgnet --n 120 --seed 2026

Writes a JSON with every structure (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_STRUCTURES = SHARED / "structures" / "2dmatpedia_subset.extxyz"
DEFAULT_REFERENCES = SHARED / "references" / "mp_elemental_references.json"
CACHE = ROOT / "benchmarks" / ".cache"


def select(frames, n: int, max_atoms: int, seed: int, mp_mu: dict, max_z: int = 94):
    keep = [
        f
        for f in frames
        if len(f) <= max_atoms
        and all(s in mp_mu for s in set(f.get_chemical_symbols()))
        and max(f.get_atomic_numbers()) <= max_z
        and np.isfinite(f.info.get("energy_per_atom", np.nan))
    ]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(keep), size=min(n, len(keep)), replace=False)
    return [keep[i] for i in sorted(idx)], len(keep)


def ml_references(elements, calculator, info, log):
    """μ per element with this potential, cached on disk by checkpoint sha256."""
    from aiida_automat.energy.references import compute_reference

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"references_{info.name}_{(info.sha256 or info.version)[:16]}.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    for symbol in sorted(elements):
        if symbol in cached:
            continue
        start = time.perf_counter()
        ref = compute_reference(symbol, calculator)
        cached[symbol] = {**ref.as_dict(), "time_s": time.perf_counter() - start}
        log(f"  reference {symbol:2s} {ref.label:12s} {ref.energy_per_atom:9.4f} eV/atom ({cached[symbol]['time_s']:.1f} s)")
        path.write_text(json.dumps(cached, indent=1, sort_keys=True))
    return {s: cached[s] for s in elements}


def stats(errors) -> dict:
    e = np.abs(np.asarray([x for x in errors if x is not None and np.isfinite(x)], dtype=float))
    if not len(e):
        return {"n": 0, "mae": None, "median": None, "rmse": None}
    return {"n": int(len(e)), "mae": float(e.mean() * 1000), "median": float(np.median(e) * 1000), "rmse": float(np.sqrt((e**2).mean()) * 1000)}


def run_potential(name, checkpoint, samples, mp_mu, args, log) -> dict:
    from aiida_automat.energy.formation import formation_energy
    from aiida_automat.energy.potentials import load_potential, single_point
    from aiida_automat.energy.relax import protocol_settings, relax_2d
    from aiida_automat.energy.scale import mp2020_correct
    from aiida_automat.errors import AutomatError, PotentialError

    try:
        calculator, info = load_potential(name, checkpoint, device=args.device, num_threads=args.threads)
    except PotentialError as exc:
        return {"potential": name, "available": False, "reason": str(exc)}
    log(f"{info.label}")
    elements = sorted({s for f in samples for s in f.get_chemical_symbols()})
    start = time.perf_counter()
    refs = ml_references(elements, calculator, info, log)
    ref_time = time.perf_counter() - start
    ml_mu = {s: r["energy_per_atom"] for s, r in refs.items()}
    settings = protocol_settings(args.protocol)

    rows = []
    for i, frame in enumerate(samples):
        atoms = frame.copy()
        atoms.calc = None
        dft_raw = float(frame.info["energy_per_atom"])
        row = {"material_id": frame.info.get("material_id"), "formula": atoms.get_chemical_formula(), "natoms": len(atoms)}
        try:
            corrected = mp2020_correct(atoms, dft_raw)
        except AutomatError as exc:
            row["skipped"] = str(exc)
            rows.append(row)
            continue
        row["dft_eform"] = formation_energy(atoms, corrected.corrected_energy_per_atom, mp_mu).formation_energy_per_atom
        row["dft_eform_raw"] = formation_energy(atoms, dft_raw, mp_mu).formation_energy_per_atom
        row["e_above_hull_dft"] = float(frame.info.get("decomposition_energy", np.nan))
        try:
            t0 = time.perf_counter()
            sp = single_point(atoms, calculator)
            row["time_sp_s"] = time.perf_counter() - t0
            row["sp_eform"] = formation_energy(atoms, sp.energy_per_atom, ml_mu).formation_energy_per_atom
            row["sp_eform_dftmu"] = formation_energy(atoms, sp.energy_per_atom, mp_mu).formation_energy_per_atom
            t0 = time.perf_counter()
            rel = relax_2d(atoms, calculator, settings, keep_trajectory=False)
            row["time_relax_s"] = time.perf_counter() - t0
            row["relax_eform"] = formation_energy(atoms, rel.energy_per_atom, ml_mu).formation_energy_per_atom
            row["relax_eform_dftmu"] = formation_energy(atoms, rel.energy_per_atom, mp_mu).formation_energy_per_atom
            row["relax_converged"] = rel.converged
            row["relax_steps"] = rel.steps
            row["in_plane_strain"] = float(
                np.sqrt(np.linalg.norm(np.cross(*rel.atoms.cell[:2])) / np.linalg.norm(np.cross(*atoms.cell[:2]))) - 1
            )
        except AutomatError as exc:
            row["failed"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        if "sp_eform" in row and "relax_eform" in row:
            log(
                f"[{i + 1:3d}/{len(samples)}] {row['material_id']:>9s} {row['formula']:12s} DFT {row['dft_eform']:+.3f} "
                f"SP {row['sp_eform']:+.3f} relax {row['relax_eform']:+.3f} ({row['time_relax_s']:.1f} s, {row['relax_steps']} steps)"
            )

    ok = [r for r in rows if "relax_eform" in r]

    def err(key, ref="dft_eform"):
        return [r[key] - r[ref] for r in ok]

    mu_diff = {s: ml_mu[s] - mp_mu[s] for s in elements}
    summary = {
        "potential": info.name,
        "version": info.version,
        "sha256": info.sha256,
        "available": True,
        "n_structures": len(samples),
        "n_evaluated": len(ok),
        "n_skipped_correction": sum("skipped" in r for r in rows),
        "n_failed": sum("failed" in r for r in rows),
        "single_point": stats(err("sp_eform")),
        "relaxed": stats(err("relax_eform")),
        "single_point_dft_mu": stats(err("sp_eform_dftmu")),
        "relaxed_dft_mu": stats(err("relax_eform_dftmu")),
        "single_point_vs_uncorrected": stats(err("sp_eform", "dft_eform_raw")),
        "relaxed_converged": sum(bool(r.get("relax_converged")) for r in ok),
        "time_single_point_s": float(np.mean([r["time_sp_s"] for r in ok])) if ok else None,
        "time_relax_s": float(np.mean([r["time_relax_s"] for r in ok])) if ok else None,
        "time_relax_median_s": float(np.median([r["time_relax_s"] for r in ok])) if ok else None,
        "references_time_s": ref_time,
        "references_mae_vs_dft_meV": float(np.mean(np.abs(list(mu_diff.values()))) * 1000),
        "references_worst": sorted(((s, round(d * 1000, 1)) for s, d in mu_diff.items()), key=lambda t: -abs(t[1]))[:8],
        "mean_abs_in_plane_strain": float(np.mean([abs(r["in_plane_strain"]) for r in ok])) if ok else None,
        "worst_relaxed": sorted(
            ((r["material_id"], r["formula"], round((r["relax_eform"] - r["dft_eform"]) * 1000, 1)) for r in ok),
            key=lambda t: -abs(t[2]),
        )[:8],
    }
    return {"summary": summary, "rows": rows, "references": refs}


def fmt(x, digits=0):
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(results) -> str:
    lines = [
        "| potential | n | MAE single point (meV/atom) | median | MAE relaxed (meV/atom) | median | MAE SP, DFT μ | MAE relaxed, DFT μ | MAE SP vs uncorrected DFT | μ MAE vs MP (meV/atom) | time SP (s) | time relax (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        s = res.get("summary", res)
        if not s.get("available"):
            lines.append(f"| {s['potential']} | — | weights not available offline | | | | | | | | | |")
            continue
        lines.append(
            f"| {s['potential']} {s['version']} | {s['n_evaluated']} | {fmt(s['single_point']['mae'])} | {fmt(s['single_point']['median'])} | "
            f"{fmt(s['relaxed']['mae'])} | {fmt(s['relaxed']['median'])} | {fmt(s['single_point_dft_mu']['mae'])} | "
            f"{fmt(s['relaxed_dft_mu']['mae'])} | {fmt(s['single_point_vs_uncorrected']['mae'])} | {fmt(s['references_mae_vs_dft_meV'])} | "
            f"{fmt(s['time_single_point_s'], 2)} | {fmt(s['time_relax_s'], 1)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--potential", action="append", help="chgnet, mattersim, sevennet (repeatable); default chgnet + mattersim")
    parser.add_argument("--checkpoint", default=None, help="checkpoint path/name for a single --potential")
    parser.add_argument("--structures", default=str(DEFAULT_STRUCTURES))
    parser.add_argument("--references", default=str(DEFAULT_REFERENCES))
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--max-atoms", type=int, default=12)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--protocol", default="moderate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "energy.json"))
    args = parser.parse_args(argv)

    from ase.io import read

    from aiida_automat.energy.scale import load_mp_references

    def log(msg):
        print(msg, flush=True)

    mp_mu = load_mp_references(args.references)
    frames = read(args.structures, index=":")
    samples, pool = select(frames, args.n, args.max_atoms, args.seed, mp_mu)
    log(f"{len(samples)} of {pool} 2DMatPedia structures with ≤ {args.max_atoms} atoms (seed {args.seed})")
    potentials = args.potential or ["chgnet", "mattersim"]
    results = []
    for name in potentials:
        checkpoint = args.checkpoint if len(potentials) == 1 else None
        results.append(run_potential(name, checkpoint, samples, mp_mu, args, log))
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}",
        "python": platform.python_version(),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    print()
    print(markdown(results))
    for res in results:
        if "summary" in res:
            print(json.dumps(res["summary"], indent=1, default=str))
        else:
            print(json.dumps(res, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
