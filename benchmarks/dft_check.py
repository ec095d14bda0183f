"""Benchmark of ``automat.dft_check``: ML vs Quantum ESPRESSO vs 2DMatPedia formation energies.

For small 2DMatPedia monolayers (at their VASP-PBE geometry) it compares

* the 2DMatPedia DFT formation energy (raw GGA, MP elemental references from
  ``../shared/data/references/mp_elemental_references.json``), and the same on the MP2020-corrected scale;
* the QE formation energy from ``DftCheckWorkChain`` (PseudoDojo 0.4 PBE, elemental references computed with
  the same code, family, protocol and cutoffs; SCF at fixed geometry) — compared with the *raw* 2DMatPedia value;
* the ML formation energy (CHGNet, and MatterSim when its weights are present) from a single point with MP
  elemental references — on the MP2020 scale, so compared with the *corrected* DFT values.

Run (from the repository root; pw.x on PATH; runs pw.x serially):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dft_check.py --out /tmp/bench_dft.json

It creates a throw-away SQLite AiiDA profile under ``--aiida-path`` (the reference cache lives there: a
second run with the same path reuses the elemental references), installs the PseudoDojo family from
``../shared`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

#: small (<= 4 atoms) monolayers made of Al, Si, P, S: all four need <= 40 Ry with PseudoDojo (low), so one
#: cutoff serves every structure and each elemental reference is computed once.
DEFAULT_IDS = (
    "2dm-5934",  # silicene Si2
    "2dm-5933",  # Al2
    "2dm-3404",  # phosphorene P4
    "2dm-6421",  # AlP
    "2dm-962",  # Al2P2
    "2dm-289",  # Al2S2
    "2dm-345",  # SiS2
    "2dm-776",  # SiS
    "2dm-2602",  # P2S2
    "2dm-5957",  # S2
)


def load_entries(ids):
    from ase.io import iread

    wanted = set(ids)
    found = {}
    for atoms in iread(SHARED / "structures" / "2dmatpedia_subset.extxyz"):
        if atoms.info.get("material_id") in wanted:
            atoms.pbc = (True, True, False)
            found[atoms.info["material_id"]] = atoms
    missing = wanted - set(found)
    if missing:
        sys.exit(f"not in the 2DMatPedia subset: {sorted(missing)}")
    return [found[i] for i in ids]


def dft_reference_formation(atoms, mu_mp):
    """2DMatPedia formation energy per atom: raw GGA and MP2020-corrected."""
    from aiida_automat.energy.formation import formation_energy
    from aiida_automat.energy.scale import mp2020_correct

    e_raw = float(atoms.info["energy_per_atom"])
    raw = formation_energy(atoms, e_raw, mu_mp).formation_energy_per_atom
    corrected = mp2020_correct(atoms, e_raw)
    return raw, raw + corrected.correction_per_atom


def ml_formation(entries, mu_mp, name):
    """{material_id: (E_f ML eV/atom, seconds)} with a single point at the DFT geometry."""
    from aiida_automat.energy.formation import formation_energy
    from aiida_automat.energy.potentials import load_potential, single_point

    calculator, info = load_potential(name, num_threads=1)
    out = {}
    for atoms in entries:
        start = time.perf_counter()
        result = single_point(atoms, calculator, stress=False)
        out[atoms.info["material_id"]] = (
            formation_energy(atoms, result.energy_per_atom, mu_mp).formation_energy_per_atom,
            time.perf_counter() - start,
        )
    return out, info.label


def setup_profile(aiida_path: pathlib.Path):
    os.environ["AIIDA_PATH"] = str(aiida_path)
    from aiida import load_profile
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    if "bench" not in config.profile_names:
        create_profile(
            config,
            storage_backend="core.sqlite_dos",
            storage_config={"filepath": str(aiida_path / "storage")},
            name="bench",
            email="bench@localhost",
        )
        config.set_default_profile("bench", overwrite=True)
        config.store()
    load_profile("bench", allow_switch=True)


def pw_code():
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_code("pw-bench@localhost")
    except NotExistent:
        pass
    try:
        computer = orm.load_computer("localhost")
    except NotExistent:
        computer = orm.Computer(
            label="localhost", hostname="localhost", transport_type="core.local", scheduler_type="core.direct",
            workdir=str(pathlib.Path(os.environ["AIIDA_PATH"]) / "work"),
        ).store()
        computer.configure()
        computer.set_default_mpiprocs_per_machine(1)
    executable = shutil.which("pw.x")
    if executable is None:
        sys.exit("pw.x not found: apt-get install -y quantum-espresso")
    return orm.InstalledCode(
        label="pw-bench", computer=computer, filepath_executable=executable,
        default_calc_job_plugin="quantumespresso.pw", with_mpi=False, prepend_text="export OMP_NUM_THREADS=1",
    ).store()


def _finished_check(atoms):
    """The latest successful DftCheckWorkChain of this profile on the same structure (formula, cell, positions)."""
    import numpy as np
    from aiida import orm

    from aiida_automat.workflows.dft_check import DftCheckWorkChain

    query = orm.QueryBuilder().append(DftCheckWorkChain, filters={"attributes.exit_status": 0}, tag="wc")
    query.order_by({DftCheckWorkChain: {"ctime": "desc"}})
    for node in query.all(flat=True):
        other = node.inputs.structure.get_ase()
        if (other.get_chemical_formula() == atoms.get_chemical_formula()
                and np.allclose(other.cell, atoms.cell, atol=1e-5)
                and np.allclose(other.positions, atoms.positions, atol=1e-5)):
            return node
    return None


def qe_formation(entries, protocol, ecutwfc, kpoints_distance, reuse=False):
    """{material_id: (dft_check dict, seconds, new references)} from DftCheckWorkChain."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_automat.workflows.dft_check import DftCheckWorkChain
    from aiida_automat.workflows.dft_references import install_pseudo_family

    install_pseudo_family(SHARED / "pseudos" / "PseudoDojo_0.4_PBE_SR_standard_upf.aiida_pseudo")
    code = pw_code()
    overrides = {
        "kpoints_distance": kpoints_distance,
        "pw": {"parameters": {"SYSTEM": {"ecutwfc": ecutwfc, "ecutrho": 4 * ecutwfc}}},
    }
    options = {"withmpi": False, "resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1},
               "max_wallclock_seconds": 3600}
    out = {}
    for atoms in entries:
        mid = atoms.info["material_id"]
        if reuse:
            previous = _finished_check(atoms)
            if previous is not None:
                out[mid] = (previous.outputs.dft_check.get_dict(), None, [])
                continue
        builder = DftCheckWorkChain.get_builder_from_protocol(
            code, orm.StructureData(ase=atoms), protocol=protocol, overrides=overrides, options=options
        )
        start = time.perf_counter()
        results, node = run_get_node(builder)
        seconds = time.perf_counter() - start
        if not node.is_finished_ok:
            print(f"{mid}: DftCheckWorkChain<{node.pk}> failed: {node.exit_status} {node.exit_message}", file=sys.stderr)
            out[mid] = (None, seconds, [])
            continue
        new_refs = sorted(
            link.link_label.removeprefix("reference_")
            for link in node.base.links.get_outgoing().all()
            if link.link_label.startswith("reference_")
        )
        out[mid] = (results["dft_check"].get_dict(), seconds, new_refs)
        print(f"{mid}: {seconds:.0f} s, new references {new_refs}", file=sys.stderr, flush=True)
    return out


def fmt(value, digits=3):
    return "—" if value is None else f"{value:+.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", nargs="*", default=list(DEFAULT_IDS), help="2DMatPedia material ids")
    parser.add_argument("--protocol", default="fast")
    parser.add_argument("--ecutwfc", type=float, default=40.0, help="Ry; ecutrho = 4x (norm-conserving)")
    parser.add_argument("--kpoints-distance", type=float, default=0.3, help="1/Å (aiida-qe fast: 0.3)")
    parser.add_argument("--aiida-path", type=pathlib.Path, default=None, help="AiiDA config dir (default: temp)")
    parser.add_argument("--no-qe", action="store_true", help="only the ML side")
    parser.add_argument("--reuse", action="store_true",
                        help="take finished QE results for the same structures from the profile (resume a run)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write all numbers as JSON")
    args = parser.parse_args(argv)

    from aiida_automat.energy.potentials import mattersim_available
    from aiida_automat.energy.scale import load_mp_references

    mu_mp = load_mp_references(SHARED / "references" / "mp_elemental_references.json")
    entries = load_entries(args.ids)
    rows = {a.info["material_id"]: {"formula": a.get_chemical_formula(), "n_atoms": len(a)} for a in entries}
    for atoms in entries:
        raw, corrected = dft_reference_formation(atoms, mu_mp)
        rows[atoms.info["material_id"]].update(ef_2dm_raw=raw, ef_2dm_mp2020=corrected)

    models = ["chgnet"] + (["mattersim"] if mattersim_available() else [])
    labels = {}
    for model in models:
        ml, labels[model] = ml_formation(entries, mu_mp, model)
        for mid, (value, seconds) in ml.items():
            rows[mid].update({f"ef_{model}": value, f"t_{model}_s": seconds})

    if not args.no_qe:
        aiida_path = args.aiida_path or pathlib.Path(tempfile.mkdtemp(prefix="automat-bench-dft-"))
        aiida_path.mkdir(parents=True, exist_ok=True)
        setup_profile(aiida_path)
        for mid, (check, seconds, new_refs) in qe_formation(
            entries, args.protocol, args.ecutwfc, args.kpoints_distance, reuse=args.reuse
        ).items():
            rows[mid].update(t_qe_s=seconds, new_references=new_refs)
            if check is not None:
                rows[mid].update(
                    ef_qe=check["formation_energy_per_atom_eV"],
                    ef_qe_mp2020=check.get("formation_energy_per_atom_mp2020_eV"),
                    qe_references=check["reference_energies_per_atom_eV"],
                )

    # ---- table
    header = ["id", "formula", "N", "E_f 2DM raw", "E_f QE", "QE−2DM", "t QE (s)", "E_f 2DM MP2020"]
    for model in models:
        header += [f"E_f {model}", f"{model}−2DM", f"{model}−QE"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    errors = {"QE−2DM": []}
    for model in models:
        errors[f"{model}−2DM"] = []
        errors[f"{model}−QE"] = []
    for mid, row in rows.items():
        qe, qe_c = row.get("ef_qe"), row.get("ef_qe_mp2020")
        d_qe = None if qe is None else qe - row["ef_2dm_raw"]
        if d_qe is not None:
            errors["QE−2DM"].append(d_qe)
        t_qe = row.get("t_qe_s")
        refs = row.get("new_references") or []
        cells = [mid, row["formula"], str(row["n_atoms"]), fmt(row["ef_2dm_raw"]), fmt(qe), fmt(d_qe),
                 "(reused)" if t_qe is None and qe is not None else "—" if t_qe is None else f"{t_qe:.0f}" + (f" (+refs {','.join(refs)})" if refs else ""),
                 fmt(row["ef_2dm_mp2020"])]
        for model in models:
            value = row[f"ef_{model}"]
            d_2dm = value - row["ef_2dm_mp2020"]
            d_qe_ml = None if qe_c is None else value - qe_c
            errors[f"{model}−2DM"].append(d_2dm)
            if d_qe_ml is not None:
                errors[f"{model}−QE"].append(d_qe_ml)
            cells += [fmt(value), fmt(d_2dm), fmt(d_qe_ml)]
        print("| " + " | ".join(cells) + " |")
    print()
    for name, values in errors.items():
        if values:
            mae = sum(abs(v) for v in values) / len(values)
            print(f"- MAE {name}: {1000 * mae:.0f} meV/atom (n = {len(values)}, max |Δ| "
                  f"{1000 * max(abs(v) for v in values):.0f})")
    for model, label in labels.items():
        print(f"- {model}: {label}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "models": labels}, indent=1, default=str))


if __name__ == "__main__":
    main()
