"""``aiida-automat simulate``: a structure file in, a stored image (and a file) out."""

from __future__ import annotations

import pathlib


def save_picture(image, path: pathlib.Path) -> None:
    """A PNG a person can look at (the .npz keeps the numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ny, nx = image.shape
    py, px = image.pixel_size_A
    ax.imshow(image.data, cmap="gray", extent=(0, nx * px, ny * py, 0))
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    ax.set_title(f"{image.microscope.mode.upper()} {image.microscope.voltage_kV:g} kV")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def simulate_structure_file(structure_path, parameters: dict, output: pathlib.Path | None) -> dict:
    """Run the ``automat.simulate`` CalcJob in-process and report what it made."""
    from aiida import orm
    from aiida.engine import run_get_node

    from ..calculations.simulate import SimulateCalculation
    from ..data.structures import atoms_to_structure, read_structure_file
    from ..errors import AutomatError
    from ..imaging.io import save_stem_image
    from ..profile import load_code

    atoms = read_structure_file(structure_path)
    code = load_code("automat")
    builder = SimulateCalculation.get_builder()
    builder.code = code
    builder.structure = atoms_to_structure(atoms)
    builder.parameters = orm.Dict(parameters)
    builder.metadata.options.max_wallclock_seconds = 3600
    results, node = run_get_node(builder)
    if not node.is_finished_ok:
        raise AutomatError(f"simulation failed (process {node.pk}, exit {node.exit_status}): {node.exit_message}")
    image = results["image"].to_stem_image()
    summary = {
        "process_pk": node.pk,
        "image_pk": results["image"].pk,
        "formula": atoms.get_chemical_formula(),
        "shape": list(image.shape),
        "pixel_size_A": list(image.pixel_size_A),
        "mode": image.microscope.mode,
        "method": parameters.get("method"),
    }
    if output is not None:
        output = pathlib.Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix.lower() == ".png":
            save_picture(image, output)
        else:
            save_stem_image(output.with_suffix(".npz"), image)
        summary["output"] = str(output)
    return summary
