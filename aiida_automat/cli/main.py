"""``aiida-automat``: the command line microscopists use.

Every command that produces science runs through AiiDA (so the result has provenance) on the embedded
default profile unless the user has one of their own; see ``aiida_automat.profile``.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import click

# AiiDA announces the creation of its configuration folder as a warning; the setup report says it better.
warnings.filterwarnings("ignore", message="Creating AiiDA configuration folder")

from .common import user_errors

MODES = ["idpc", "dpc", "haadf", "adf", "abf", "bf"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aiida-automat")
def cli():
    """From an atomic-resolution STEM image of a 2D material to a crystal structure, with provenance."""


@cli.command()
@click.option("--profile", "profile_name", default=None, help="Profile to use or create (default: the default profile, else 'automat').")
@click.option("--broker", type=click.Choice(["zeromq", "none"]), default="zeromq", show_default=True,
              help="Broker of a newly created profile: the built-in ZeroMQ broker allows `verdi daemon start` and --submit.")
@user_errors
def setup(profile_name, broker):
    """Create (or check) the AiiDA profile, the localhost computer and the codes. Idempotent."""
    from ..profile import ensure_setup

    report = ensure_setup(profile_name, broker=broker)
    state = "created" if report.created_profile else "using existing"
    click.echo(f"Profile:  {report.profile} ({state}; config in {report.config_dir})")
    click.echo(f"Computer: {report.computer}")
    for kind, label in report.codes.items():
        click.echo(f"Code:     {label} ({kind})")
    for message in report.messages:
        click.secho(f"Note:     {message}", fg="yellow")


def _microscope_options(func):
    options = [
        click.option("--mode", type=click.Choice(MODES), default="haadf", show_default=True, help="Imaging mode."),
        click.option("--voltage", "voltage_kV", type=float, default=None, help="Accelerating voltage in kV."),
        click.option("--semiangle", "semiangle_mrad", type=float, default=None, help="Convergence semiangle in mrad."),
        click.option("--defocus", "defocus_A", type=float, default=None, help="Defocus in Å (abTEM convention)."),
        click.option("--cs", "Cs_A", type=float, default=None, help="Spherical aberration C3 in Å."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _microscope_dict(mode, **values) -> dict:
    out = {"mode": mode}
    out.update({k: v for k, v in values.items() if v is not None})
    return out


@cli.command()
@click.argument("structure", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@_microscope_options
@click.option("--pixel-size", "pixel_size_A", type=float, default=0.1, show_default=True, help="Pixel size in Å.")
@click.option("--size", type=int, default=256, show_default=True, help="Image size in pixels (square).")
@click.option("--rotation", "rotation_deg", type=float, default=0.0, show_default=True, help="In-plane rotation in degrees.")
@click.option("--dose", "dose_e_per_A2", type=float, default=None, help="Electron dose in e/Å² (default: no noise).")
@click.option("--method", type=click.Choice(["multislice", "fast"]), default="multislice", show_default=True,
              help="abTEM multislice, or the fast linear model used for template libraries.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the dose noise.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Write the image here (.npz, lossless with calibration; .png for a picture).")
@user_errors
def simulate(structure, mode, voltage_kV, semiangle_mrad, defocus_A, Cs_A, pixel_size_A, size, rotation_deg,
             dose_e_per_A2, method, seed, output):
    """Simulate a STEM image of STRUCTURE (extxyz, CIF, POSCAR, ...) with the automat.simulate CalcJob."""
    from .simulate import simulate_structure_file

    parameters = {
        **_microscope_dict(mode, voltage_kV=voltage_kV, semiangle_mrad=semiangle_mrad, defocus_A=defocus_A, Cs_A=Cs_A),
        "pixel_size_A": pixel_size_A,
        "shape": [size, size],
        "rotation_deg": rotation_deg,
        "method": method,
        "seed": seed,
    }
    if dose_e_per_A2 is not None:
        parameters["dose_e_per_A2"] = dose_e_per_A2
    result = simulate_structure_file(structure, parameters, output)
    click.echo(json.dumps(result, indent=2))


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--pixel-size", type=float, default=None, help="Pixel size in Å (overrides the file's calibration).")
@click.option("--pixel-size-tolerance", type=click.FloatRange(0.0, 0.3), default=None,
              help="How far off the pixel size may be, as a fraction (0.1 = ±10 %); a uniform lattice mismatch up to "
                   "this is not held against a template (default: the file's, else 0.05; 0 for simulations).")
@click.option("--mode", type=click.Choice(MODES), default=None, help="Imaging mode (default: from the file, else haadf).")
@click.option("--voltage", type=float, default=None, help="Accelerating voltage in kV (default: from the file).")
@click.option("--semiangle", type=float, default=None, help="Convergence semiangle in mrad (default: from the file).")
@click.option("--elements", default=None, help="Only consider templates made of these elements, e.g. Mo,S.")
@click.option("--library", default=None, help="Template library name (default: the bundled library).")
@click.option("--template", "templates", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Use this structure file as a candidate instead of the library (repeatable).")
@click.option("--relax/--no-relax", default=True, show_default=True, help="Relax the result with an ML potential.")
@click.option("--potential", default="auto", show_default=True,
              help="ML potential: auto (MatterSim if its checkpoint is present, else CHGNet), chgnet, mattersim, or a checkpoint path.")
@click.option("--dft", is_flag=True, help="Check the ML energy with Quantum ESPRESSO (needs pw.x).")
@click.option("--policy", type=click.Choice(["rules", "llm"]), default="rules", show_default=True,
              help="Agent policy; llm uses OPENAI_BASE_URL / OPENAI_API_KEY / AUTOMAT_LLM_MODEL.")
@click.option("--protocol", type=click.Choice(["fast", "moderate", "precise"]), default="moderate", show_default=True)
@click.option("--submit", is_flag=True, help="Submit to the daemon instead of running in this process.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=pathlib.Path("automat-result"),
              show_default=True, help="Where structure.cif, result.json and overlay.png go (one sub-folder per image "
                                      "when several images are given).")
@user_errors
def reconstruct(images, pixel_size, pixel_size_tolerance, mode, voltage, semiangle, elements, library, templates, relax, potential, dft,
                policy, protocol, submit, output_dir):
    """Reconstruct the 2D crystal structure in each IMAGE (dm3/dm4/emd/ser/tif/hspy/npy/npz/png).

    Several images are reconstructed one after the other (or all submitted at once with --submit); a
    failing image is reported and the others go on, and the exit status is 1 if any failed.
    """
    import sys

    from ..errors import AutomatError
    from .common import echo_error, parse_elements
    from .reconstruct import print_summary, run_reconstruction

    kwargs = dict(pixel_size=pixel_size, pixel_size_tolerance=pixel_size_tolerance, mode=mode, voltage=voltage,
                  semiangle=semiangle, elements=parse_elements(elements), library=library, templates=templates, relax=relax,
                  potential=potential, dft=dft, policy=policy, protocol=protocol, submit=submit)
    if len(images) == 1:
        result = run_reconstruction(images[0], output_dir=None if submit else output_dir, **kwargs)
        if not result.get("submitted"):
            print_summary(result)
        return
    failed = []
    for image in images:
        click.echo(f"== {image}")
        try:
            result = run_reconstruction(image, output_dir=None if submit else output_dir / image.stem, **kwargs)
        except AutomatError as exc:
            echo_error(f"{image}: {str(exc).splitlines()[0]}")
            failed.append(image)
            continue
        if not result.get("submitted"):
            print_summary(result)
    if failed:
        echo_error(f"{len(failed)} of {len(images)} images failed: {', '.join(p.name for p in failed)}")
        sys.exit(1)


@cli.command()
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=pathlib.Path("automat-demo"),
              show_default=True, help="Where the demo writes its results.")
@user_errors
def demo(output_dir):
    """Run the main job on the bundled example image (the README's first command)."""
    from .demo import run_demo

    run_demo(output_dir)


from .bench import bench_group  # noqa: E402
from .daemon import daemon_group, result  # noqa: E402
from .denoise import denoise, denoiser_group  # noqa: E402
from .library import library_group  # noqa: E402

cli.add_command(library_group)
cli.add_command(bench_group)
cli.add_command(denoiser_group)
cli.add_command(denoise)
cli.add_command(daemon_group)
cli.add_command(result)


def main():  # pragma: no cover - console script convenience
    cli()
