"""``aiida-automat reconstruct``: an image file in; structure.cif, result.json and overlay.png out.

``result.json`` has a stable, documented schema (docs/usage.md): formula, lattice {a, b, gamma} (Å, deg),
cell (3×3 Å), species, positions (Cartesian Å), template {id, source, score}, outside_library, confidence,
pixel_size_measured (Å, [y, x]), energies {total, per_atom, formation_per_atom, potential} (eV), timings
per stage (s), process_pk, and schema_version.
"""

from __future__ import annotations

import json
import pathlib
import time

import click

SCHEMA_VERSION = 1


def _stage_timings(node) -> dict:
    """Wall time of each called process, summed per stage name."""
    out: dict[str, float] = {}
    for child in node.called_descendants:
        label = child.process_label or "?"
        if label in ("decide", "collect_trace"):
            label = "agent"
        seconds = (child.mtime - child.ctime).total_seconds()
        out[label] = out.get(label, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(out.items())}


def build_result(node, results: dict, pixel_size_claimed) -> dict:
    """The documented result.json payload from a finished ReconstructionWorkChain."""
    from ..data.structures import structure_to_atoms
    from ..imaging.structures import reduced_formula

    structure = results.get("relaxed_structure") or results["structure"]
    atoms = structure_to_atoms(structure)
    diag = results["diagnostics"].get_dict()
    template = results["template"]
    a, b, c, al, be, ga = atoms.cell.cellpar()
    k = float(diag.get("calibration_factor", 1.0)) if diag.get("calibration_corrected") else 1.0
    energies = None
    if "energies" in results:
        e = results["energies"].get_dict()
        energies = {
            "total": e.get("energy"),
            "per_atom": e.get("energy_per_atom"),
            "formation_per_atom": e.get("formation_energy_per_atom"),
            "potential": e.get("model", {}).get("name") if isinstance(e.get("model"), dict) else e.get("model"),
        }
    template_id = template.base.extras.get("template_id", template.label or template.uuid)
    retrieved = {}
    if "retrieval" in results:
        ranking = results["retrieval"].get_dict()
        retrieved = next((c for c in ranking.get("candidates", []) if c.get("template_id") == template_id), {})
        retrieved = {**retrieved, "library": ranking.get("library")}
    return {
        "schema_version": SCHEMA_VERSION,
        "formula": reduced_formula(atoms),
        "lattice": {"a": float(a), "b": float(b), "gamma": float(ga)},
        "lattice_measured": diag.get("lattice"),
        "cell": atoms.cell.array.tolist(),
        "species": atoms.get_chemical_symbols(),
        "positions": atoms.positions.tolist(),
        "relaxed": "relaxed_structure" in results,
        "template": {
            "id": template_id,
            "source": retrieved.get("library") or template.base.extras.get("source"),
            "score": float(retrieved.get("probability", diag.get("registration_score", 0.0))),
            "rank": retrieved.get("rank"),
            "uuid": template.uuid,
        },
        "outside_library": bool(retrieved.get("outside_library", False)),
        "confidence": float(results["verification"]["score"]) if "verification" in results else diag.get("confidence"),
        "pixel_size_measured": [float(p) / k for p in pixel_size_claimed],
        "pixel_size_claimed": [float(p) for p in pixel_size_claimed],
        "spacegroup": diag.get("spacegroup"),
        "strain": diag.get("strain"),
        "distortion_removed": diag.get("distortion_removed"),
        "flagged_columns": len(diag.get("flagged_columns", [])),
        "energies": energies,
        "timings": _stage_timings(node),
        "process_pk": node.pk,
    }


def run_reconstruction(image_path, *, pixel_size=None, mode=None, voltage=None, semiangle=None, elements=None,
                       library=None, templates=(), relax=True, potential="auto", dft=False, policy="rules",
                       protocol="moderate", submit=False, output_dir=None, echo=click.echo) -> dict:
    from aiida import orm
    from aiida.engine import run_get_node, submit as aiida_submit

    from ..data.stem_image import StemImageData
    from ..data.structures import atoms_to_structure, read_structure_file
    from ..errors import AutomatError
    from ..imaging.io import read_image
    from ..profile import ensure_setup, load_code
    from ..workflows.reconstruction import ReconstructionWorkChain

    t0 = time.perf_counter()
    setup = ensure_setup()
    echo(f"profile {setup.profile}")
    img = read_image(image_path, pixel_size_A=pixel_size, mode=mode, voltage_kV=voltage, semiangle_mrad=semiangle)
    img.validate()
    echo(f"image   {img.source}: {img.shape[0]}×{img.shape[1]} px, {img.pixel_size_A[0]:.4f} Å/px "
         f"({img.metadata.get('calibration_source', '?')}), {img.microscope.mode.upper()} {img.microscope.voltage_kV:g} kV")
    image_node = StemImageData(img).store()

    template_nodes = [atoms_to_structure(read_structure_file(p)) for p in templates]
    for node, path in zip(template_nodes, templates):
        node.label = pathlib.Path(path).stem
        node.store()
        node.base.extras.set_many({"template_id": node.label, "source": str(path)})
    library_node = None
    if not template_nodes:
        from .library import library_for_image

        library_node = library_for_image(img, library, echo=echo)

    params = {"relax": bool(relax), "dft": bool(dft)}
    if elements:
        params["elements"] = list(elements)
    builder = ReconstructionWorkChain.get_builder_from_protocol(
        image_node, protocol=protocol, overrides={"parameters": params},
        templates=template_nodes or None, library=library_node, code=load_code("automat"), policy=policy,
    )
    if relax and potential not in (None, "auto"):
        from ..data.model import ModelCheckpointData

        builder.model = ModelCheckpointData.get_or_create(potential)
    if dft:
        try:
            builder.pw_code = load_code("pw")
        except LookupError as exc:
            raise AutomatError(str(exc)) from None
        builder.dft_parameters = orm.Dict({"protocol": "fast", "options": {"withmpi": False}})
    if submit:
        node = aiida_submit(builder)
        echo(f"submitted ReconstructionWorkChain<{node.pk}>; follow it with `verdi process status {node.pk}`")
        return {"process_pk": node.pk, "submitted": True}
    echo(f"running ReconstructionWorkChain (protocol {protocol}, policy {policy}) ...")
    results, node = run_get_node(builder)
    if not node.is_finished_ok:
        raise AutomatError(
            f"reconstruction failed (process {node.pk}, exit {node.exit_status}): {node.exit_message}; "
            f"see `verdi process report {node.pk}`"
        )
    result = build_result(node, results, img.pixel_size_A)
    result["timings"]["total"] = round(time.perf_counter() - t0, 3)
    if output_dir is not None:
        out = pathlib.Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        structure = results.get("relaxed_structure") or results["structure"]
        from ..calculations.functions import _cif_text
        from ..data.structures import structure_to_atoms

        (out / "structure.cif").write_text(_cif_text(structure_to_atoms(structure)))
        (out / "overlay.png").write_bytes(results["overlay"].get_content(mode="rb"))
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        result["output_dir"] = str(out)
    return result


def print_summary(result: dict, echo=click.echo) -> None:
    lat = result["lattice"]
    echo("")
    echo(f"formula      {result['formula']}  (space group {result.get('spacegroup')})")
    echo(f"template     {result['template']['id']}{'  [outside library]' if result['outside_library'] else ''}")
    m = result.get("lattice_measured") or lat
    echo(f"lattice      a = {m['a']:.4f} Å, b = {m['b']:.4f} Å, γ = {m['gamma']:.2f}° (measured)")
    if result["relaxed"]:
        echo(f"relaxed      a = {lat['a']:.4f} Å, b = {lat['b']:.4f} Å, γ = {lat['gamma']:.2f}°")
    py, px = result["pixel_size_measured"]
    echo(f"pixel size   {py:.4f} Å/px measured (file: {result['pixel_size_claimed'][0]:.4f})")
    echo(f"confidence   {result['confidence']:.3f}")
    if result.get("energies"):
        e = result["energies"]
        form = e.get("formation_per_atom")
        echo(f"energy       {e['per_atom']:.4f} eV/atom ({e['potential']})"
             + (f", formation {form:.4f} eV/atom" if form is not None else ""))
    echo(f"process      {result['process_pk']}  (verdi process report {result['process_pk']})")
    if result.get("output_dir"):
        echo(f"written      {result['output_dir']}/structure.cif, result.json, overlay.png")
