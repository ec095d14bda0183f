"""Parser of ``automat.denoise``: ``denoised.npz`` → ``StemImageData``, the status report → ``Dict``.

Failures the executable reports (blank/too-small image → 320, unloadable checkpoint → 440, checkpoint
bytes that are not the node's → 441) arrive through ``status.json`` via ``AutomatParser``. Here the
report is checked once more against the input node, so an output never claims other weights.
"""

from __future__ import annotations

from aiida import orm
from aiida.engine import ExitCode

from ..cli.stage_denoise import OUTPUT_FILE
from .base import AutomatParser

REPORT_KEYS = (
    "setting", "keep_aperiodic", "gate_weights", "gate_features", "noise_sigma_before", "noise_sigma_after",
    "model_sha256", "shape", "pixel_size_A", "denoise_seconds", "wall_time_s",
)


class DenoiseParser(AutomatParser):
    def parse_outputs(self, retrieved, status: dict):
        used = status.get("model_sha256")
        expected = self.node.inputs.model.sha256
        if used is not None and used != expected:
            return self.exit_codes.ERROR_CHECKSUM_MISMATCH.format(
                message=f"the executable used sha256 {used[:12]}…, the input node is {expected[:12]}…")
        image = self.read_stem_image(retrieved, OUTPUT_FILE)
        if isinstance(image, ExitCode):
            return image
        self.out("image", image)
        self.out("report", orm.Dict({k: status[k] for k in REPORT_KEYS if k in status}))
        return None
