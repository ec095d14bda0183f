"""``aiida-automat bench``: generate a benchmark image set and score the pipeline on it (no AiiDA needed)."""

from __future__ import annotations

import click

from .common import user_errors


def _progress():
    """A click progress bar (stderr) driven by ``progress(done, total, label)``; a new bar per label kind."""
    state = {"bar": None, "done": 0, "kind": None}

    def progress(done, total, label=""):
        kind = "library" if label == "library" else "items"
        if state["bar"] is None or state["kind"] != kind:
            if state["bar"] is not None:
                state["bar"].__exit__(None, None, None)
            state["bar"] = click.progressbar(length=total, label="library" if kind == "library" else "images",
                                             file=click.get_text_stream("stderr"), show_pos=True,
                                             item_show_func=lambda s: s)
            state["bar"].__enter__()
            state["done"], state["kind"] = 0, kind
        state["bar"].current_item = None if kind == "library" else label
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


@bench_group.command("generate")
@click.option("--structures", "structures_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Structure file to pick from (default: the 2DMatPedia subset, which carries DFT energies).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder (resumable).")
@click.option("--n", type=int, default=9, show_default=True, help="Number of structures (equal unary/binary/ternary shares).")
@click.option("--modes", default="idpc,adf", show_default=True, help="Imaging modes, comma separated.")
@click.option("--doses", default="3e3,1e4,3e4,6e4", show_default=True, help="Doses in e⁻/Å², comma separated.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pixel-size", "pixel_size_A", type=float, default=0.1, show_default=True, help="Å/px.")
@click.option("--size", type=int, default=256, show_default=True, help="Image size in px (square).")
@click.option("--voltage", "voltage_kV", type=float, default=80.0, show_default=True, help="kV.")
@click.option("--semiangle", "semiangle_mrad", type=float, default=30.0, show_default=True, help="mrad.")
@click.option("--method", type=click.Choice(["multislice", "fast"]), default="multislice", show_default=True,
              help="abTEM multislice, or the fast linear model (tests, quick looks).")
@user_errors
def generate_cmd(structures_path, out_dir, n, modes, doses, seed, pixel_size_A, size, voltage_kV, semiangle_mrad, method):
    """Pick structures by tier and simulate their images (skips files that exist)."""
    from ..bench.generate import generate

    res = generate(structures_path, out_dir, n=n, modes=[m.strip() for m in modes.split(",") if m.strip()],
                   doses=_floats(doses), seed=seed, pixel_size_A=pixel_size_A, size=size, voltage_kV=voltage_kV,
                   semiangle_mrad=semiangle_mrad, method=method, progress=_progress())
    click.echo(f"{res.n_structures} structures, {res.n_images} images in {res.out_dir}: {res.n_written} written, "
               f"{res.n_skipped} already there, {res.n_failed} failed ({res.seconds:.0f} s)")
    for err in res.errors:
        click.echo(f"  failed: {err}", err=True)


@bench_group.command("run")
@click.argument("bench_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--library", default="default", show_default=True,
              help="'default' (bundled structures), a structure file/folder, or a saved library .npz; built for the "
                   "set's optics and cached in BENCH_DIR.")
@click.option("--exclude-from-library", is_flag=True, help="Drop the true structures' ids from the library.")
@click.option("--k", type=int, default=5, show_default=True, help="Candidates reconstructed per image.")
@click.option("--policy", type=click.Choice(["fixed"]), default="fixed", show_default=True,
              help="Decision policy (the in-process benchmark runs the fixed pipeline).")
@click.option("--energy/--no-energy", default=True, show_default=True,
              help="Formation energies with the ML potential vs DFT (needs the 2DMatPedia energies).")
@click.option("--relax", is_flag=True, help="Relax the structures with the potential before the energy.")
@click.option("--potential", default="chgnet", show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N images (quick looks).")
@user_errors
def run_cmd(bench_dir, library, exclude_from_library, k, policy, energy, relax, potential, limit):
    """Run the pipeline, the oracle template and the AutoMat-style baseline on every image of BENCH_DIR."""
    from ..bench.run import run

    res = run(bench_dir, library=library, exclude_from_library=exclude_from_library, k=k, policy=policy,
              energy=energy, relax=relax, potential=potential, limit=limit, progress=_progress())
    for name, s in res["summary"].items():
        o = s["overall"]
        click.echo(f"{name:>17}: {o['success']}/{o['n']} structures right"
                   + (f", E_form MAE {o['eform_mae_meV']:.0f} meV/atom (oracle {o['eform_oracle_mae_meV']:.0f})"
                      if o.get("eform_mae_meV") is not None and o.get("eform_oracle_mae_meV") is not None else ""))
    click.echo(f"wrote {bench_dir}/results.json and {bench_dir}/report.md")


if __name__ == "__main__":  # python -m aiida_automat.cli.bench (before the group is registered in cli.main)
    bench_group()
