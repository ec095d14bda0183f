"""``automat.denoise``: the mixture-of-experts denoiser as a CalcJob, run by ``automat-exec denoise``.

A CalcJob (besides the ``denoise_image`` calcfunction) because a full-frame image at 0.05 Å/px is a few
thousand pixels square and the CNN expert wants the GPU or cluster node the user chose. The checkpoint is
always an input node (``ModelCheckpointData``, family ``denoiser``; default: the bundled one), so the
graph names the exact weights, the job's hash changes with them (caching never mixes checkpoints) and the
file travels to the remote working directory together with its training sidecar.
"""

from __future__ import annotations

import json

from aiida import orm

from ..cli.stage_denoise import DEFAULTS, IMAGE_FILE, MODEL_FILE, OUTPUT_FILE, SIDECAR_FILE, check_parameters
from ..data.model import DENOISER, ModelCheckpointData
from ..data.stem_image import StemImageData
from .base import AutomatCalcJob, dict_input, validator_from_check

PARAMETERS_HELP = (
    "Denoiser settings, all optional: setting ('auto': the gate weighs the experts; 'light': no Bragg "
    "averaging, safest for defects; 'strong': Bragg filter weighted at least 0.5 when a lattice is found; "
    "'none': the input unchanged) and keep_aperiodic (keep vacancies, dopants and edges the lattice filter "
    f"would average away). Defaults: {DEFAULTS}."
)


def default_denoiser() -> ModelCheckpointData:
    """The bundled checkpoint's node, stored once and reused (found by its sha256)."""
    return ModelCheckpointData.get_or_create(DENOISER)


def sidecar_text(model: ModelCheckpointData) -> str:
    """The training sidecar ``load_model`` reads next to the checkpoint, with the node's sha256."""
    return json.dumps({**model.config, "sha256": model.sha256}, indent=2, sort_keys=True)


# a lambda, so the check is looked up when called (tests replace it to exercise the executable's own check)
validate_parameters = validator_from_check(lambda parameters: check_parameters(parameters))


def validate_model(value, _ctx=None):
    if value is not None and value.name != DENOISER:
        return f"model must be a denoiser checkpoint (name {DENOISER!r}), got a {value.name!r} model"
    return None


class DenoiseCalculation(AutomatCalcJob):
    """Denoise ``image`` with the checkpoint ``model``; the denoised image and a report out."""

    _stage = "denoise"
    _output_files = (OUTPUT_FILE,)
    CACHE_VERSION = 1  # see AutomatCalcJob
    _default_parser = "automat.denoise"

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("image", valid_type=StemImageData, help="The calibrated image to denoise.")
        spec.input(
            "model",
            valid_type=ModelCheckpointData,
            default=default_denoiser,
            validator=validate_model,
            help="Denoiser checkpoint (family 'denoiser'); default: the one bundled with the package.",
        )
        spec.input(
            "parameters",
            valid_type=orm.Dict,
            required=False,
            validator=validate_parameters,
            help=PARAMETERS_HELP,
        )
        spec.output(
            "image",
            valid_type=StemImageData,
            help="The denoised image: same shape and calibration; metadata.denoise names setting, gate weights "
            "and the checkpoint's sha256.",
        )
        spec.output(
            "report",
            valid_type=orm.Dict,
            help="Gate weights and features, noise σ before/after (image units), checkpoint sha256, timing (s).",
        )
        spec.default_output_node = "report"

    def stage_parameters(self) -> dict:
        params = check_parameters(dict_input(self.inputs.get("parameters")))
        model = self.inputs.model
        params.update(
            image_file=IMAGE_FILE,
            output_file=OUTPUT_FILE,
            model={"path": MODEL_FILE, "sha256": model.sha256, "version": model.version},
        )
        return params

    def write_stage_inputs(self, folder) -> list:
        from ..imaging.io import save_stem_image

        with folder.open(IMAGE_FILE, "wb") as handle:
            save_stem_image(handle, self.inputs.image.to_stem_image())
        model = self.inputs.model
        with folder.open(SIDECAR_FILE, "w", encoding="utf8") as handle:
            handle.write(sidecar_text(model))
        return [(model.uuid, model.filename, MODEL_FILE)]
