"""``aiida-automat bench``: generate a benchmark image set and score the pipeline on it (no AiiDA needed,
except with ``bench run --daemon``, which runs the product as WorkChains on the daemon)."""

from __future__ import annotations

import click

from .common import user_errors


def _progress():
    """A click progress bar (stderr) driven by ``progress(done, total, label)``; a new bar per label kind
    (the library build, WorkChains submitted / finished on the daemon, images scored)."""
    state = {"bar": None, "done": 0, "kind": None}
    titles = {"library": "library", "submitted": "submitting", "workchain": "WorkChains finished", "items": "images"}

    def progress(done, total, label=""):
        kind = label if label in titles else "items"
        if state["bar"] is None or state["kind"] != kind:
            if state["bar"] is not None:
                state["bar"].__exit__(None, None, None)
            state["bar"] = click.progressbar(length=total, label=titles[kind], file=click.get_text_stream("stderr"),
                                             show_pos=True, item_show_func=lambda s: s)
            state["bar"].__enter__()
            state["done"], state["kind"] = 0, kind
        state["bar"].current_item = label if kind == "items" else None
        state["bar"].update(done - state["done"])
        state["done"] = done
        if done >= total:
            state["bar"].__exit__(None, None, None)
            state["bar"] = None

    return progress


def _floats(value: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not out or any(v <= 0 for v in out):
        raise click.BadParameter("doses must be positive numbers")
    return out


@click.group("bench")
def bench_group():
    """Benchmark: simulated images with known structures → success rates, errors, timings."""


_GENERATE_DEFAULTS = {"n": 9, "modes": "idpc,adf", "doses": "3e3,1e4,3e4,6e4", "seed": 0, "pixel_size_A": 0.1,
                      "size": 256, "voltage_kV": 80.0, "semiangle_mrad": 30.0, "method": "multislice"}


def _preset_help() -> str:
    from ..bench.generate import PRESETS

    return "; ".join(f"{name}: {p['n']} structures × {','.join(p['modes'])} × doses {','.join(f'{d:g}' for d in p['doses'])}"
                     for name, p in PRESETS.items())


@bench_group.command("generate")
@click.option("--structures", "structures_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Structure file to pick from (default: the 2DMatPedia subset, which carries DFT energies).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder (resumable).")
@click.option("--preset", type=click.Choice(["stem2mat-small"]), default=None,
              help="A named set (options given explicitly override it): " + _preset_help() + ".")
@click.option("--n", type=int, default=None, help="Number of structures (equal unary/binary/ternary shares). [default: 9]")
@click.option("--modes", default=None, help="Imaging modes, comma separated. [default: idpc,adf]")
@click.option("--doses", default=None, help="Doses in e⁻/Å², comma separated. [default: 3e3,1e4,3e4,6e4]")
@click.option("--seed", type=int, default=None, help="[default: 0]")
@click.option("--pixel-size", "pixel_size_A", type=float, default=None, help="Å/px. [default: 0.1]")
@click.option("--size", type=int, default=None, help="Image size in px (square). [default: 256]")
@click.option("--voltage", "voltage_kV", type=float, default=None, help="kV. [default: 80]")
@click.option("--semiangle", "semiangle_mrad", type=float, default=None, help="mrad. [default: 30]")
@click.option("--method", type=click.Choice(["multislice", "fast"]), default=None,
              help="abTEM multislice, or the fast linear model (tests, quick looks). [default: multislice]")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Structures simulated at a time in parallel processes (same files). Set OMP_NUM_THREADS=1.")
@user_errors
def generate_cmd(structures_path, out_dir, preset, workers, **given):
    """Pick structures by tier and simulate their images (skips files that exist)."""
    from ..bench.generate import PRESETS, generate

    opts = dict(_GENERATE_DEFAULTS)
    if preset:
        opts.update({k: (",".join(f"{x:g}" if isinstance(x, float) else x for x in v) if isinstance(v, tuple) else v)
                     for k, v in PRESETS[preset].items()})
    opts.update({k: v for k, v in given.items() if v is not None})
    if opts["n"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    res = generate(structures_path, out_dir, n=opts["n"], modes=[m.strip() for m in opts["modes"].split(",") if m.strip()],
                   doses=_floats(opts["doses"]), seed=opts["seed"], pixel_size_A=opts["pixel_size_A"], size=opts["size"],
                   voltage_kV=opts["voltage_kV"], semiangle_mrad=opts["semiangle_mrad"], method=opts["method"],
                   workers=workers, progress=_progress())
    click.echo(f"{res.n_structures} structures, {res.n_images} images in {res.out_dir}: {res.n_written} written, "
               f"{res.n_skipped} already there, {res.n_failed} failed ({res.seconds:.0f} s)")
    for err in res.errors:
        click.echo(f"  failed: {err}", err=True)


def resolve_library(value: str):
    """``--library``: 'default', an existing .npz / structure file / folder (passed on as a path), or the
    name of a stored ``TemplateLibraryData`` (loaded from the AiiDA profile, sha256 checked)."""
    import pathlib

    if value in ("default", "bundled") or pathlib.Path(value).exists():
        return value
    if value.endswith((".npz", ".extxyz", ".xyz", ".cif")) or "/" in value:
        raise FileNotFoundError(f"library file {value} does not exist")
    from aiida import get_profile

    from ..data.library import TemplateLibraryData

    if get_profile() is None:
        from ..profile import ensure_setup

        ensure_setup()
    return TemplateLibraryData.from_name(value).load_library()


@bench_group.command("run")
@click.argument("bench_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--library", default="default", show_default=True,
              help="'default' (bundled structures, built for the set's optics and cached in BENCH_DIR), a structure "
                   "file/folder (built likewise), a saved library .npz, or the name of a stored library "
                   "(`aiida-automat library list`).")
@click.option("--exclude-from-library", is_flag=True, help="Drop the true structures' ids from the library.")
@click.option("--k", type=int, default=5, show_default=True, help="Candidates retrieved per image.")
@click.option("--policy", type=click.Choice(["rules", "llm", "fixed"]), default="rules", show_default=True,
              help="Candidate loop: the agent's rules or LLM policy (as the WorkChain; llm needs OPENAI_BASE_URL or "
                   "OPENAI_API_KEY), or 'fixed' (score every top-k candidate, keep the best).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel processes (one structure per job); results equal the serial run's. Set OMP_NUM_THREADS=1.")
@click.option("--energy/--no-energy", default=True, show_default=True,
              help="Formation energies with the ML potential vs DFT (needs the 2DMatPedia energies).")
@click.option("--relax", is_flag=True, help="Relax the structures with the potential before the energy.")
@click.option("--potential", default="chgnet", show_default=True)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG figures next to report.md.")
@click.option("--pipelines", default="pipeline,oracle_template,automat_baseline", show_default=True,
              help="Which to run, comma separated (also 'workchain': the product on the daemon, as --daemon).")
@click.option("--limit", type=int, default=None, help="Only the first N images (quick looks).")
@click.option("--denoiser/--no-denoiser", default=True, show_default=True,
              help="Let the agent denoise an image whose raw lattice is not found (bundled checkpoint, as the "
                   "WorkChain's protocols).")
@click.option("--daemon", is_flag=True,
              help="Run the product pipeline as ReconstructionWorkChains on the AiiDA daemon (rows 'workchain', with "
                   "provenance; needs `aiida-automat daemon start 2`); a rerun reuses the WorkChains recorded in "
                   "BENCH_DIR/daemon_pks.json. Oracle and baseline still run here.")
@user_errors
def run_cmd(bench_dir, library, exclude_from_library, k, policy, workers, energy, relax, potential, plots, pipelines,
            limit, denoiser, daemon):
    """Run the pipeline, the oracle template and the AutoMat-style baseline on every image of BENCH_DIR."""
    from ..bench.run import run

    names = tuple(x.strip() for x in pipelines.split(",") if x.strip())
    if daemon:  # the product runs on the daemon instead of here
        names = tuple(dict.fromkeys("workchain" if n == "pipeline" else n for n in names))
        if "workchain" not in names:
            names = ("workchain", *names)
    res = run(bench_dir, library=resolve_library(library), exclude_from_library=exclude_from_library, k=k,
              policy=policy, workers=workers, energy=energy, relax=relax, potential=potential, plots=plots,
              pipelines=names, limit=limit, progress=_progress(), denoiser=denoiser)
    for name, s in res["summary"].items():
        o = s["overall"]
        click.echo(f"{name:>17}: {o['success']}/{o['n']} structures right"
                   + (f", E_form MAE {o['eform_mae_meV']:.0f} meV/atom (oracle {o['eform_oracle_mae_meV']:.0f})"
                      if o.get("eform_mae_meV") is not None and o.get("eform_oracle_mae_meV") is not None else ""))
    for w in (res.get("library") or {}).get("warnings", []):
        click.echo(f"Warning: {w}", err=True)
    figures = "".join(f", {bench_dir}/{f}" for f in res.get("figures", {}))
    click.echo(f"wrote {bench_dir}/results.json, {bench_dir}/report.md{figures}")


if __name__ == "__main__":  # python -m aiida_automat.cli.bench (same as `aiida-automat bench`)
    bench_group()
