"""``aiida-automat denoiser train`` and ``aiida-automat denoise``."""

from __future__ import annotations

import pathlib

import click

from .common import user_errors


@click.group("denoiser")
def denoiser_group():
    """The mixture-of-experts denoiser: training."""


@denoiser_group.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def train(args):
    """Train a checkpoint (options: --out DIR --n-images N --steps N --seed S --minutes M)."""
    from ..denoise.train import main

    main(list(args))


@click.command("denoise")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--pixel-size", type=float, default=None, help="Pixel size in Å (overrides the file).")
@click.option("--setting", type=click.Choice(["auto", "light", "strong", "none"]), default="auto", show_default=True)
@click.option("--keep-aperiodic/--no-keep-aperiodic", default=True, show_default=True,
              help="Keep non-periodic features (vacancies, dopants) instead of pure Bragg filtering.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=pathlib.Path), required=True,
              help="Denoised image (.npz with calibration, or .png).")
@click.option("--calcjob", is_flag=True,
              help="Run the automat.denoise CalcJob on the AiiDA profile: image, checkpoint and result are stored "
                   "with provenance; prints the process PK.")
@user_errors
def denoise(image, pixel_size, setting, keep_aperiodic, output, calcjob):
    """Denoise IMAGE and write it with its calibration."""
    from ..denoise import denoise as core_denoise
    from ..imaging.io import read_image, save_stem_image
    from .simulate import save_picture

    picture = read_image(image, pixel_size_A=pixel_size)
    if calcjob:
        denoised, report, pk = run_denoise_calcjob(picture, {"setting": setting, "keep_aperiodic": keep_aperiodic})
        gate, sigma = report["gate_weights"], report["noise_sigma_before"]
    else:
        result = core_denoise(picture, setting=setting, keep_aperiodic=keep_aperiodic)
        denoised, gate, sigma, pk = result.image, result.gate_weights, result.noise_sigma, None
    if output.suffix.lower() == ".png":
        save_picture(denoised, output)
    else:
        save_stem_image(output.with_suffix(".npz"), denoised)
    weights = ", ".join(f"{k} {v:.2f}" for k, v in gate.items())
    process = "" if pk is None else f"; process {pk}"
    click.echo(f"noise σ {sigma:.4g}; experts: {weights}; written {output}{process}")


def run_denoise_calcjob(picture, parameters: dict):
    """(denoised StemImage, report dict, process PK) from the ``automat.denoise`` CalcJob, run in-process."""
    from aiida import orm
    from aiida.engine import run_get_node

    from ..calculations.denoise import DenoiseCalculation
    from ..data.stem_image import StemImageData
    from ..errors import AutomatError
    from ..profile import load_code

    builder = DenoiseCalculation.get_builder()
    builder.code = load_code("automat")
    builder.image = StemImageData(picture)
    builder.parameters = orm.Dict(parameters)
    results, node = run_get_node(builder)
    if not node.is_finished_ok:
        raise AutomatError(f"denoising failed (process {node.pk}, exit {node.exit_status}): {node.exit_message}")
    return results["image"].to_stem_image(), results["report"].get_dict(), node.pk
