"""Parser of ``SimulateCalculation``: ``image.npz`` → ``StemImageData``."""

from __future__ import annotations

from ..cli.stage_simulate import IMAGE_FILE
from ..data.stem_image import StemImageData
from ..errors import ImageError
from .base import AutomatParser


class SimulateParser(AutomatParser):
    """The executable already succeeded (status.json said so); only the output file can still be wrong."""

    def parse_outputs(self, retrieved, status: dict):
        from ..imaging.io import load_stem_image

        try:
            content = retrieved.base.repository.get_object_content(IMAGE_FILE, mode="rb")
        except (FileNotFoundError, OSError):
            return self.exit_codes.ERROR_OUTPUT_MISSING
        try:
            node = StemImageData(load_stem_image(content))
        except ImageError as exc:
            self.logger.error(f"{IMAGE_FILE}: {exc}")
            return self.exit_codes.ERROR_OUTPUT_CORRUPT
        self.out("image", node)
        return None
