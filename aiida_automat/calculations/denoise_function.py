"""``denoise_image``: the denoiser as a calcfunction, for small images inside a WorkChain.

Same checkpoint check, same core call and same outputs as the ``automat.denoise`` CalcJob (both go
through ``cli.stage_denoise``), without a working directory or a scheduler: a 512² image takes a second
or two on a CPU, less than a CalcJob's submission. The model is a required input, so the calcfunction's
hash — like the CalcJob's — changes with the weights; pass ``default_denoiser()`` for the bundled one.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

from aiida import orm
from aiida.engine import calcfunction

from ..cli.stage_denoise import MODEL_FILE, SIDECAR_FILE, denoise_with_report, load_checked_model
from ..data.model import DENOISER
from ..data.stem_image import StemImageData
from ..errors import AutomatError
from ..exit_codes import exit_code, label_for_exception
from .denoise import default_denoiser, sidecar_text

__all__ = ("default_denoiser", "denoise_image")


@calcfunction
def denoise_image(image, model, parameters=None):
    """Denoise ``image`` (StemImageData) with ``model`` (ModelCheckpointData, family 'denoiser').

    ``parameters`` (Dict, optional): ``setting`` (auto | light | strong | none), ``keep_aperiodic`` (bool).
    Returns ``image`` (StemImageData) and ``report`` (Dict), or the exit code of the core error.
    """
    if model.name != DENOISER:
        return exit_code("ERROR_INVALID_INPUT", f"model must be a denoiser checkpoint, got a {model.name!r} model")
    params = {} if parameters is None else parameters.get_dict()
    try:
        with tempfile.TemporaryDirectory(prefix="automat-denoise-") as tmp:
            path = pathlib.Path(tmp) / MODEL_FILE
            with model.open(mode="rb") as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target)
            (pathlib.Path(tmp) / SIDECAR_FILE).write_text(sidecar_text(model), encoding="utf8")
            net = load_checked_model(path, model.sha256)
        denoised, report = denoise_with_report(image.to_stem_image(), net, params)
    except AutomatError as exc:
        return exit_code(label_for_exception(exc), str(exc))
    return {"image": StemImageData(denoised), "report": orm.Dict(report)}
