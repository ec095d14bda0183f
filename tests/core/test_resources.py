"""Every bundled run-time file is listed in resources/SOURCES.md with the sha256 it really has."""

from __future__ import annotations

import re

from aiida_automat.hashing import file_sha256
from aiida_automat.denoise.model import RESOURCE_DIR as _DENOISER_DIR

RESOURCES = _DENOISER_DIR.parent
ROW = re.compile(r"^\| `([^`]+)`.*\| `([0-9a-f]{64})`")


def test_sources_table_matches_the_files():
    rows = [ROW.match(line) for line in (RESOURCES / "SOURCES.md").read_text().splitlines()]
    listed = {m.group(1): m.group(2) for m in rows if m}
    assert len(listed) >= 4
    for rel, sha in listed.items():
        assert file_sha256(RESOURCES / rel) == sha, f"{rel}: SOURCES.md lists {sha[:12]}…, update it"
