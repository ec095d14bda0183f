"""Shared parser logic: read ``status.json`` and map a core failure to its exit code."""

from __future__ import annotations

import json

from aiida.parsers import Parser

from ..calculations.base import STATUS_FILE
from ..exit_codes import ERROR_LABELS


class AutomatParser(Parser):
    """Subclasses implement ``parse_outputs(retrieved)`` and return an exit code or None."""

    #: bump when parsing changes the outputs of the same retrieved files (part of the CalcJob's cache hash)
    CACHE_VERSION = 1

    def parse(self, **kwargs):
        try:
            retrieved = self.retrieved
        except Exception:  # noqa: BLE001 - AiiDA raises NotExistent
            return self.exit_codes.ERROR_NO_RETRIEVED_FOLDER
        try:
            status = json.loads(retrieved.base.repository.get_object_content(STATUS_FILE))
        except (FileNotFoundError, OSError):
            return self.exit_codes.ERROR_STATUS_MISSING
        except ValueError:
            return self.exit_codes.ERROR_OUTPUT_CORRUPT
        if not status.get("ok", False):
            label = ERROR_LABELS.get(status.get("error_class", ""), "ERROR_UNEXPECTED")
            message = str(status.get("message", "no message"))
            self.logger.error(f"{status.get('error_class', 'error')}: {message}")
            return getattr(self.exit_codes, label).format(message=message)
        return self.parse_outputs(retrieved, status)

    def parse_outputs(self, retrieved, status: dict):
        raise NotImplementedError

    def read_text(self, retrieved, name: str) -> str:
        return retrieved.base.repository.get_object_content(name)

    def read_stem_image(self, retrieved, name: str):
        """``StemImageData`` of a retrieved native image, or the exit code that says why there is none."""
        from ..data.stem_image import StemImageData
        from ..errors import ImageError
        from ..imaging.io import load_stem_image

        try:
            content = retrieved.base.repository.get_object_content(name, mode="rb")
        except (FileNotFoundError, OSError):
            return self.exit_codes.ERROR_OUTPUT_MISSING
        try:
            return StemImageData(load_stem_image(content))
        except ImageError as exc:
            self.logger.error(f"{name}: {exc}")
            return self.exit_codes.ERROR_OUTPUT_CORRUPT
