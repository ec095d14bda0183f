"""sha256 of files and streams: how every bundled file, checkpoint, library and image is identified."""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def stream_sha256(handle, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(chunk), b""):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return stream_sha256(handle)
