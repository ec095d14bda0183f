"""``ModelCheckpointData``: the weights of an interatomic potential as a file node with its sha256.

Like aiida-pseudo's pseudopotential nodes, a checkpoint is identified by the hash of its content:
``get_or_create`` returns the stored node with the same sha256 (and family) when one exists, so a model
is stored once and every calculation that used it links to the same node. CalcJobs copy the file to the
remote working directory, so offline cluster nodes run exactly these weights.

Attributes: ``name`` (family: mattersim | chgnet | sevennet, or ``denoiser`` for the image denoiser's
checkpoint), ``version`` (e.g. ``mattersim-v1.0.0-1M``, ``0.3.0``) and ``sha256``. A denoiser node also
keeps its training sidecar (``denoiser.json``) as the ``config`` attribute: the executable needs its
``model_pixel_A`` and the graph should show how the weights were made.
"""

from __future__ import annotations

import os
import pathlib

from aiida import orm
from aiida.common.exceptions import ValidationError

from ..hashing import stream_sha256 as _sha256_stream
from ..energy.potentials import FAMILIES as POTENTIAL_FAMILIES
from ..energy.potentials import resolve_checkpoint, sha256_file

DENOISER = "denoiser"
FAMILIES = (*POTENTIAL_FAMILIES, DENOISER)


def guess_family(path: str | os.PathLike) -> str | None:
    name = pathlib.Path(path).name.lower()
    for family in FAMILIES:
        if family in name or (family == "sevennet" and "7net" in name):
            return family
    return None


class ModelCheckpointData(orm.SinglefileData):
    """A potential's checkpoint file plus ``name`` (family), ``version`` and ``sha256``."""

    def __init__(self, file=None, filename=None, *, name: str | None = None, version: str | None = None, **kwargs):
        super().__init__(file, filename=filename, **kwargs)
        if name is not None:
            if name not in FAMILIES:
                raise ValueError(f"unknown potential family {name!r}; choose one of {FAMILIES}")
            self.base.attributes.set("name", name)
        if version is not None:
            self.base.attributes.set("version", str(version))

    def set_file(self, file, filename=None):
        """Store the file and its sha256."""
        super().set_file(file, filename=filename)
        with self.open(mode="rb") as handle:
            self.base.attributes.set("sha256", _sha256_stream(handle))

    @property
    def name(self) -> str:
        return self.base.attributes.get("name")

    @property
    def version(self) -> str:
        return self.base.attributes.get("version")

    @property
    def sha256(self) -> str:
        return self.base.attributes.get("sha256")

    @property
    def config(self) -> dict:
        return self.base.attributes.get("config", {})

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "filename": self.filename}

    def _validate(self):
        super()._validate()
        if self.name not in FAMILIES:
            raise ValidationError(f"attribute `name` must be one of {FAMILIES}, got {self.name!r}")
        if not self.version:
            raise ValidationError("attribute `version` is not set")
        with self.open(mode="rb") as handle:
            if _sha256_stream(handle) != self.sha256:
                raise ValidationError("attribute `sha256` does not match the file content")

    @classmethod
    def find(cls, sha256: str, name: str | None = None):
        """The stored node with this sha256 (and family), or None."""
        filters = {"attributes.sha256": sha256}
        if name is not None:
            filters["attributes.name"] = name
        builder = orm.QueryBuilder().append(cls, filters=filters, project="*", tag="model")
        builder.order_by({"model": {"ctime": "asc"}})
        found = builder.first()
        return None if found is None else found[0]

    @classmethod
    def get_or_create(
        cls,
        source: str | os.PathLike = "auto",
        *,
        name: str | None = None,
        version: str | None = None,
        allow_download: bool = False,
        store: bool = True,
    ) -> "ModelCheckpointData":
        """The node for a checkpoint, reusing a stored one with the same sha256.

        ``source``: a file path, or a name — ``auto`` (MatterSim if its checkpoint is cached, else CHGNet),
        ``mattersim`` / ``mattersim-v1.0.0-1M`` / ``mattersim-v1.0.0-5M`` (MatterSim cache, or MatterSim's
        own download with ``allow_download``), ``chgnet`` / ``chgnet-0.3.0`` / ``chgnet-0.2.0`` (weights
        inside the chgnet wheel), ``denoiser`` (the bundled denoiser checkpoint; a ``.pt`` path with
        ``name="denoiser"`` for another one). ``name`` forces the family of a file path (otherwise guessed
        from its name).
        """
        family, checkpoint = _parse_source(source, name)
        if family == DENOISER:
            return _denoiser_node(cls, checkpoint, version, store)
        family, resolved_version, path = resolve_checkpoint(family, checkpoint, allow_download=allow_download)
        if path is None:
            raise ValueError(f"{family} model {checkpoint!r} has no local file; pass the checkpoint's path")
        sha = sha256_file(path)
        existing = cls.find(sha, family)
        if existing is not None:
            return existing
        node = cls(str(path), name=family, version=version or resolved_version)
        if store:
            node.store()
        return node


def _parse_source(source, name: str | None):
    text = str(source)
    path = pathlib.Path(text).expanduser()
    if path.is_file():
        family = name or guess_family(path)
        if family is None:
            raise ValueError(f"cannot tell the potential family of {path.name}; pass name=mattersim|chgnet|sevennet")
        return family, str(path.resolve())
    lower = text.lower()
    if lower == "auto":
        return "auto", None
    for family in FAMILIES:
        if lower == family:
            return family, None
        if lower.startswith(family):
            rest = text[len(family):].lstrip("-_ ")
            return family, (text if family == "mattersim" else rest) or None
    raise ValueError(f"{source!r} is neither a file nor a known model name (auto, mattersim[-v1.0.0-1M|5M], chgnet[-0.3.0], "
                     "denoiser)")


def _denoiser_node(cls, checkpoint, version, store):
    """A denoiser checkpoint (default: the bundled one) with its sidecar config, refused when the file's
    sha256 differs from the one the sidecar recorded at training time."""
    import json

    from ..denoise.model import CHECKPOINT_NAME, RESOURCE_DIR

    path = pathlib.Path(checkpoint) if checkpoint else RESOURCE_DIR / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"denoiser checkpoint {path} not found")
    sidecar = path.with_suffix(".json")
    config = json.loads(sidecar.read_text(encoding="utf8")) if sidecar.is_file() else {}
    sha = sha256_file(path)
    if config.get("sha256") and config["sha256"] != sha:
        raise ValueError(f"denoiser checkpoint {path} has sha256 {sha[:12]}…, but {sidecar.name} records "
                         f"{config['sha256'][:12]}…; the file is corrupt or was replaced")
    existing = cls.find(sha, DENOISER)
    if existing is not None:
        return existing
    node = cls(str(path), name=DENOISER, version=version or config.get("date") or f"sha256-{sha[:12]}")
    node.base.attributes.set("config", config)
    if store:
        node.store()
    return node
