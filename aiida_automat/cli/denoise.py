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
@user_errors
def denoise(image, pixel_size, setting, keep_aperiodic, output):
    """Denoise IMAGE and write it with its calibration."""
    from ..denoise import denoise as core_denoise
    from ..imaging.io import read_image, save_stem_image
    from .simulate import save_picture

    result = core_denoise(read_image(image, pixel_size_A=pixel_size), setting=setting, keep_aperiodic=keep_aperiodic)
    if output.suffix.lower() == ".png":
        save_picture(result.image, output)
    else:
        save_stem_image(output.with_suffix(".npz"), result.image)
    weights = ", ".join(f"{k} {v:.2f}" for k, v in result.gate_weights.items())
    click.echo(f"noise σ {result.noise_sigma:.4g}; experts: {weights}; written {output}")
