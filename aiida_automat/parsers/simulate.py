"""Parser of ``SimulateCalculation``: ``image.npz`` → ``StemImageData``."""

from __future__ import annotations

from aiida.engine import ExitCode

from ..cli.stage_simulate import IMAGE_FILE
from .base import AutomatParser


class SimulateParser(AutomatParser):
    """The executable already succeeded (status.json said so); only the output file can still be wrong."""

    def parse_outputs(self, retrieved, status: dict):
        image = self.read_stem_image(retrieved, IMAGE_FILE)
        if isinstance(image, ExitCode):
            return image
        self.out("image", image)
        return None
