"""Calcfunctions for the cheap stages: lattice, reconstruction, verification, and agent decisions.

Each wraps one core function, converting nodes to core objects and back through the data layer, so the
provenance graph shows exactly which image, lattice and template produced which structure. Core errors
propagate as exceptions here; the WorkChain maps them to exit codes via ``aiida_automat.exit_codes``.
"""

from __future__ import annotations

import io
import tempfile

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from ..data.structures import atoms_to_structure, structure_to_atoms
from ..jsonable import to_json


def _params(node: orm.Dict | None) -> dict:
    return {} if node is None else node.get_dict()


@calcfunction
def measure_lattice(image, parameters=None):
    """The image's 2D lattice (FFT, all indexed peaks), with the scan-distortion estimate."""
    from ..lattice.measure import measure_lattice as core_measure

    p = _params(parameters)
    img = image.to_stem_image()
    lat = core_measure(img, **{k: v for k, v in p.items() if k in ("min_spacing_A", "max_spacing_A", "snr_threshold")})
    out = {
        "vectors_px": lat.vectors_px.tolist(),
        "vectors_A": lat.vectors_A.tolist(),
        "a_A": lat.a_A,
        "b_A": lat.b_A,
        "gamma_deg": lat.gamma_deg,
        "a_sigma_A": lat.a_sigma_A,
        "b_sigma_A": lat.b_sigma_A,
        "rotation_deg": lat.rotation_deg,
        "peak_snr": lat.peak_snr,
        "n_indexed": lat.n_indexed,
        "periodicity": lat.periodicity,
        "pixel_size_A": list(lat.pixel_size_A),
    }
    try:
        from ..lattice.distortion import estimate_distortion

        out["distortion"] = estimate_distortion(lat).as_dict()
    except Exception as exc:  # noqa: BLE001 - the distortion estimate is a diagnostic, not required
        out["distortion"] = {"error": f"{type(exc).__name__}: {exc}"}
    return orm.Dict(to_json(out))


@calcfunction
def reconstruct_candidate(image, lattice, template, parameters=None):
    """One candidate: register ``template`` on the measured lattice and build the structure."""
    from ..reconstruct.overlay import overlay_png
    from ..reconstruct.pipeline import reconstruct

    p = _params(parameters)
    img = image.to_stem_image()
    V = np.asarray(lattice["vectors_px"], dtype=float)
    rec = reconstruct(
        img, structure_to_atoms(template), V,
        calibration_tol=p.get("calibration_tol", 0.04),
        strain_tol=p.get("strain_tol", 0.02),
        symmetrize=p.get("symmetrize", True),
        symprec_A=p.get("symprec_A", 0.1),
    )
    structure = atoms_to_structure(rec.atoms)
    diagnostics = rec.diagnostics()
    diagnostics["template_uuid"] = template.uuid
    with tempfile.TemporaryDirectory() as tmp:
        png = overlay_png(f"{tmp}/overlay.png", img, rec.cell.vectors_px, rec.species,
                          title=f"{diagnostics['formula']}  confidence {rec.confidence:.3f}")
        overlay = orm.SinglefileData(io.BytesIO(png.read_bytes()), filename="overlay.png")
    cif_text = _cif_text(rec.atoms)
    cif = orm.SinglefileData(io.BytesIO(cif_text.encode()), filename="structure.cif")
    return {"structure": structure, "diagnostics": orm.Dict(to_json(diagnostics)), "overlay": overlay, "cif": cif}


@calcfunction
def verify_candidate(image, lattice, structure, diagnostics=None):
    """Re-image the reconstructed structure (fast model) and score it against the observed image.

    ``ranking_score`` is the verification NCC on the measured lattice's data norm (``size_neutral_score``, so cells
    of different sizes compete on the same data) minus mild penalties for the isotropic strain the template needed
    beyond the image's pixel-size tolerance and, on images in beam fractions, for an absolute contrast the structure
    cannot produce (``reconstruct.scoring.candidate_score``, shared with the benchmark).
    """
    from ..reconstruct.scoring import candidate_score

    strain = 0.0
    if diagnostics is not None and diagnostics.get("strain") is not None:
        strain = float(abs(np.trace(np.asarray(diagnostics["strain"], dtype=float)) / 2.0))
    out = candidate_score(image.to_stem_image(), lattice["vectors_px"], structure_to_atoms(structure), strain)
    return orm.Dict(out)


@calcfunction
def decide(state, policy):
    """One agent decision: state summary and policy settings in; action, reason, policy, model, reply out."""
    from ..agent.llm import get_policy
    from ..agent.state import AgentState

    settings = policy.get_dict()
    name = settings.pop("name", "rules")
    chooser = get_policy(name, **{k: v for k, v in settings.items() if k in ("model", "base_url", "timeout_s")})
    decision = chooser.decide(AgentState.from_dict(state.get_dict()))
    return orm.Dict(to_json(decision.as_dict()))


@calcfunction
def collect_trace(**decisions):
    """The agent trace as one List node, in step order."""
    keys = sorted(decisions, key=lambda k: int(k.split("_")[-1]))
    return orm.List([{k2: v for k2, v in decisions[k].get_dict().items() if k2 != "raw_reply"} for k in keys])


def _cif_text(atoms) -> str:
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    a = atoms.copy()
    a.pbc = True
    return str(CifWriter(AseAtomsAdaptor.get_structure(a), symprec=None))

