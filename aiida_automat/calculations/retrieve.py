"""``automat.retrieve``: rank library templates for an image, with provenance.

Inputs: the image (``StemImageData``), the library index (``TemplateLibraryData``) and optional
parameters (``k``, ``elements``, ``mode``, ``max_supercell``). Outputs: ``result`` (Dict: ranked candidates
with calibrated scores, each with the UUID of the library's template ``StructureData``) and
``candidate_1`` … ``candidate_k`` (the template structures, created here so the graph links image →
retrieval → structure). Core errors become exit codes from the one table in ``exit_codes``.
"""

from __future__ import annotations


from aiida import orm
from aiida.engine import ExitCode, calcfunction

from ..errors import AutomatError
from ..jsonable import to_json
from ..exit_codes import COMMON_EXIT_CODES, label_for_exception, status_for_label

ALLOWED = ("k", "elements", "mode", "max_supercell", "propose_outside", "outside_chi2")



@calcfunction
def retrieve(image, library, parameters=None):
    """Top-k templates for ``image`` from ``library`` (see ``aiida_automat.library.retrieve``)."""
    from ..library.retrieve import retrieve as core_retrieve
    from ..data.structures import atoms_to_structure

    params = {} if parameters is None else parameters.get_dict()
    unknown = set(params) - set(ALLOWED)
    if unknown:
        return _exit("ERROR_INVALID_INPUT", f"unknown parameter(s) {', '.join(sorted(unknown))}")
    try:
        lib = library.load_library()
        result = core_retrieve(image.to_stem_image(), lib, **params)
    except AutomatError as exc:
        return _exit(label_for_exception(exc), str(exc))
    out = result.as_dict()
    uuids = library.structure_uuids
    for cand in out["candidates"]:
        cand["structure_uuid"] = uuids.get(cand["template_id"])
    if out["prototype"] is not None:
        out["prototype"]["structure_uuid"] = uuids.get(out["prototype"]["template_id"])
    out["library_uuid"] = library.uuid
    outputs = {"result": orm.Dict(to_json(out))}
    for cand in result.candidates:
        s = atoms_to_structure(lib.atoms(cand.index))
        s.label = cand.template_id[:255]
        s.base.extras.set("template_id", cand.template_id)
        outputs[f"candidate_{cand.rank}"] = s
    return outputs


def _exit(label: str, message: str) -> ExitCode:
    template = {name: msg for _, name, msg in COMMON_EXIT_CODES}[label]
    return ExitCode(status_for_label(label), template.format(message=message))
