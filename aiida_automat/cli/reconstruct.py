"""``aiida-automat reconstruct``: an image file in; structure.cif, result.json and overlay.png out.

``result.json`` has a stable, documented schema (docs/usage.md): formula, lattice {a, b, gamma} (Å, deg),
cell (3×3 Å), species, positions (Cartesian Å), template {id, source, score}, outside_library, alternatives
[{formula, template_id, verification_score, uuid}] (other formulas the image does not rule out), confidence,
pixel_size_measured (Å, [y, x]), energies {total, per_atom, formation_per_atom, potential} (eV), timings
per stage (s), process_pk, and schema_version.
"""

from __future__ import annotations

import json
import pathlib
import time

import click

from ..workflows.process_summary import alternatives, failure_reasons, stage_timings, template_id
from .common import short_tracebacks

SCHEMA_VERSION = 1


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
    tid = template_id(template)
    retrieved = {}
    if "retrieval" in results:
        ranking = results["retrieval"].get_dict()
        retrieved = next((c for c in ranking.get("candidates", []) if c.get("template_id") == tid), {})
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
            "id": tid,
            "source": retrieved.get("library") or template.base.extras.get("source", None),
            "score": float(retrieved.get("probability", diag.get("registration_score", 0.0))),
            "rank": retrieved.get("rank"),
            "uuid": template.uuid,
        },
        "outside_library": bool(retrieved.get("outside_library", False)),
        "alternatives": alternatives(results),
        "confidence": float(results["verification"]["score"]) if "verification" in results else diag.get("confidence"),
        "pixel_size_measured": [float(p) / k for p in pixel_size_claimed],
        "pixel_size_claimed": [float(p) for p in pixel_size_claimed],
        "spacegroup": diag.get("spacegroup"),
        "strain": diag.get("strain"),
        "distortion_removed": diag.get("distortion_removed"),
        "flagged_columns": len(diag.get("flagged_columns", [])),
        "energies": energies,
        "timings": stage_timings(node),
        "process_pk": node.pk,
    }


def run_reconstruction(image_path, *, pixel_size=None, pixel_size_tolerance=None, mode=None, voltage=None,
                       semiangle=None, elements=None, library=None, templates=(), relax=True, potential="auto",
                       dft=False, policy="rules",
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
    if pixel_size_tolerance is not None:
        img = img.replace(metadata={**img.metadata, "pixel_size_tolerance": float(pixel_size_tolerance)})
    img.validate()
    echo(f"image   {img.source}: {img.shape[0]}×{img.shape[1]} px, {img.pixel_size_A[0]:.4f} Å/px "
         f"({img.metadata.get('calibration_source', '?')}), {img.microscope.mode.upper()} {img.microscope.voltage_kV:g} kV")

    # Every input that can be refused is checked before the first node is stored: a refused run leaves
    # no orphan image or template nodes behind (tests/aiida/test_bad_inputs_cli.py counts them).
    template_atoms = [read_structure_file(p) for p in templates]
    library_node = None
    if not template_atoms:
        from .library import library_for_image

        library_node = library_for_image(img, library, echo=echo)
    model_node = None
    if relax and potential not in (None, "auto"):
        from ..data.model import ModelCheckpointData

        model_node = ModelCheckpointData.get_or_create(potential)
    pw_code = None
    if dft:
        try:
            pw_code = load_code("pw")
        except LookupError as exc:
            raise AutomatError(str(exc)) from None
    code = load_code("automat")

    image_node = StemImageData(img).store()
    template_nodes = [atoms_to_structure(atoms) for atoms in template_atoms]
    for node, path in zip(template_nodes, templates):
        node.label = pathlib.Path(path).stem
        node.store()
        node.base.extras.set_many({"template_id": node.label, "source": str(path)})

    params = {"relax": bool(relax), "dft": bool(dft)}
    if elements:
        params["elements"] = list(elements)
    builder = ReconstructionWorkChain.get_builder_from_protocol(
        image_node, protocol=protocol, overrides={"parameters": params},
        templates=template_nodes or None, library=library_node, code=code, policy=policy,
    )
    if model_node is not None:
        builder.model = model_node
    if pw_code is not None:
        builder.pw_code = pw_code
        builder.dft_parameters = orm.Dict({"protocol": "fast", "options": {"withmpi": False}})
    if submit:
        from aiida.common.exceptions import InvalidOperation

        try:
            node = aiida_submit(builder)
        except InvalidOperation as exc:  # the ZeroMQ broker lives inside the daemon: none running, no submit
            raise AutomatError(f"cannot submit: no daemon is running for profile {setup.profile}; "
                               "start one with `aiida-automat daemon start 2` or run without --submit") from exc
        echo(f"submitted ReconstructionWorkChain<{node.pk}>; follow it with `verdi process status {node.pk}`, "
             f"then write its files with `aiida-automat result {node.pk}`")
        return {"process_pk": node.pk, "submitted": True}
    echo(f"running ReconstructionWorkChain (protocol {protocol}, policy {policy}) ...")
    with short_tracebacks():
        _, node = run_get_node(builder)
    result = result_of(node)
    result["timings"]["total"] = round(time.perf_counter() - t0, 3)
    if output_dir is not None:
        write_outputs(node, result, output_dir)
    return result


def result_of(node) -> dict:
    """The result.json payload of a finished ReconstructionWorkChain (run here or by the daemon)."""
    from ..errors import AutomatError

    if not node.is_terminated:
        raise AutomatError(f"process {node.pk} has not finished yet ({node.process_state.value}); "
                           f"see `verdi process status {node.pk}`")
    if not node.is_finished_ok:
        raise AutomatError(
            f"reconstruction failed (process {node.pk}, exit {node.exit_status}): {node.exit_message}"
            f"{failure_reasons(node)}; see `verdi process report {node.pk}`"
        )
    results = {link.link_label: link.node for link in node.base.links.get_outgoing().all()
               if link.link_type.value == "return"}
    return build_result(node, results, node.inputs.image.pixel_size_A)


def write_outputs(node, result: dict, output_dir) -> None:
    """DIR/structure.cif, DIR/result.json and DIR/overlay.png, each written whole or not at all."""
    from ..calculations.functions import _cif_text
    from ..data.structures import structure_to_atoms

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = node.outputs
    structure = outputs.relaxed_structure if "relaxed_structure" in outputs else outputs.structure
    files = {
        "structure.cif": _cif_text(structure_to_atoms(structure)).encode(),
        "overlay.png": outputs.overlay.get_content(mode="rb"),
        "result.json": (json.dumps(result, indent=2) + "\n").encode(),
    }
    for name, content in files.items():
        tmp = out / f".{name}.part"
        tmp.write_bytes(content)
        tmp.replace(out / name)
    result["output_dir"] = str(out)


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
    if result.get("alternatives"):
        others = ", ".join(f"{a['formula']} ({a['template_id']}, {a['verification_score']:.3f})" for a in result["alternatives"])
        echo(f"not excluded {others} — fit the image about as well (see result.json 'alternatives')")
    if result.get("energies"):
        e = result["energies"]
        form = e.get("formation_per_atom")
        echo(f"energy       {e['per_atom']:.4f} eV/atom ({e['potential']})"
             + (f", formation {form:.4f} eV/atom" if form is not None else ""))
    echo(f"process      {result['process_pk']}  (verdi process report {result['process_pk']})")
    if result.get("output_dir"):
        echo(f"written      {result['output_dir']}/structure.cif, result.json, overlay.png")
