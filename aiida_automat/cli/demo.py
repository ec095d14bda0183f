"""The README's main job: the bundled example image, end to end, on the embedded profile."""

from __future__ import annotations

import pathlib

import click

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "resources" / "example" / "mos2_haadf.npy"


def run_demo(output_dir: pathlib.Path) -> dict:
    from .reconstruct import print_summary, run_reconstruction

    click.echo(f"aiida-automat demo: reconstructing {EXAMPLE.name} (simulated HAADF image of monolayer MoS2)")
    result = run_reconstruction(EXAMPLE, relax=True, potential="auto", protocol="fast", output_dir=output_dir)
    print_summary(result)
    return result
