"""``TemplateLibraryData``: a template library index as a file node with its sha256, plus its Group.

Pattern of aiida-pseudo: the index (``.npz`` written by ``library.index.TemplateLibrary``) is a
``SinglefileData`` whose attributes record ``sha256`` (content), ``build_key`` (sha256 of the *inputs*:
structures, modes, optics, descriptor version), ``name``, ``n_templates``, ``modes`` and the microscopes.
The template structures are stored once as ``StructureData`` in the Group ``automat/library/<name>``
(with the index node), and the index node maps template id → structure UUID, so a retrieval can point
at the exact provenance nodes. ``get_or_build`` returns the stored node with the same build key instead of
rebuilding: a library is rebuilt only when an input changed.
"""

from __future__ import annotations

import hashlib
import io
import json

from aiida import orm
from aiida.common.exceptions import ValidationError

from ..errors import LibraryError

__all__ = ["TemplateLibraryData", "GROUP_PREFIX", "get_or_build"]

GROUP_PREFIX = "automat/library/"


class TemplateLibraryData(orm.SinglefileData):
    """A template library index file (``.npz``) with its sha256 and build key."""

    @classmethod
    def from_library(cls, library, filename: str | None = None, **kwargs) -> "TemplateLibraryData":
        data = library.to_bytes()
        node = cls(io.BytesIO(data), filename=filename or f"{library.name}.npz", **kwargs)
        attrs = node.base.attributes
        attrs.set("name", library.name)
        attrs.set("build_key", library.build_key)
        attrs.set("n_templates", len(library))
        attrs.set("modes", list(library.modes))
        attrs.set("microscopes", {m: mic.as_dict() for m, mic in library.microscopes.items()})
        attrs.set("summary", json.loads(json.dumps(library.summary(), default=str)))
        return node

    def set_file(self, file, filename=None):
        super().set_file(file, filename=filename)
        with self.open(mode="rb") as handle:
            self.base.attributes.set("sha256", hashlib.sha256(handle.read()).hexdigest())

    @property
    def sha256(self) -> str:
        return self.base.attributes.get("sha256")

    @property
    def build_key(self) -> str:
        return self.base.attributes.get("build_key", "")

    @property
    def name(self) -> str:
        return self.base.attributes.get("name", "")

    @property
    def structure_uuids(self) -> dict:
        return self.base.attributes.get("structure_uuids", {})

    def load_library(self):
        """The core ``TemplateLibrary`` (sha256 checked)."""
        from ..library.index import TemplateLibrary

        with self.open(mode="rb") as handle:
            return TemplateLibrary.from_bytes(handle.read(), expected_sha256=self.sha256)

    def get_structure(self, template_id: str) -> orm.StructureData | None:
        uuid = self.structure_uuids.get(template_id)
        return None if uuid is None else orm.load_node(uuid)

    def _validate(self):
        super()._validate()
        with self.open(mode="rb") as handle:
            if hashlib.sha256(handle.read()).hexdigest() != self.sha256:
                raise ValidationError("attribute `sha256` does not match the file content")

    @classmethod
    def find(cls, build_key: str) -> "TemplateLibraryData | None":
        qb = orm.QueryBuilder().append(cls, filters={"attributes.build_key": build_key}, tag="lib")
        qb.order_by({"lib": {"ctime": "desc"}})
        hit = qb.first()
        return None if hit is None else hit[0]

    @classmethod
    def list_libraries(cls) -> list["TemplateLibraryData"]:
        qb = orm.QueryBuilder().append(cls, tag="lib").order_by({"lib": {"ctime": "asc"}})
        return [row[0] for row in qb.all()]

    @classmethod
    def from_name(cls, name: str) -> "TemplateLibraryData":
        qb = orm.QueryBuilder().append(cls, filters={"attributes.name": name}, tag="lib").order_by({"lib": {"ctime": "desc"}})
        hit = qb.first()
        if hit is None:
            raise LibraryError(f"no template library named {name!r}; build one with `aiida-automat library build --name {name}`")
        return hit[0]


def _group_structures(group: orm.Group) -> list:
    from .structures import structure_to_atoms

    out = []
    for node in group.nodes:
        if isinstance(node, orm.StructureData):
            atoms = structure_to_atoms(node)
            atoms.info["template_id"] = node.base.extras.get("template_id", None) or node.label or node.uuid
            atoms.info["source"] = f"group:{group.label}"
            atoms.info["_uuid"] = node.uuid
            out.append(atoms)
    if not out:
        raise LibraryError(f"group {group.label!r} holds no StructureData")
    return out


def get_or_build(structures=None, *, name: str = "default", modes=("idpc", "adf"), microscope=None,
                 progress=None, store_structures: bool = True, **optics) -> TemplateLibraryData:
    """The stored library for these inputs, building (and storing) it only when none matches.

    ``structures``: ``None`` (bundled set), a path (file/folder), a list of paths or ``Atoms``, or an
    ``orm.Group`` of ``StructureData`` (its nodes are then the template nodes themselves).
    """
    from ..library.build import build_key, build_library, library_microscopes
    from .structures import atoms_to_structure

    group_nodes = None
    if isinstance(structures, orm.Group):
        structures = _group_structures(structures)
        group_nodes = {a.info["template_id"]: a.info["_uuid"] for a in structures}
    mics = library_microscopes(tuple(modes), microscope, **optics)
    key = build_key(structures, mics)
    existing = TemplateLibraryData.find(key)
    if existing is not None:
        return existing
    library = build_library(structures, name=name, modes=modes, microscope=microscope, progress=progress, **optics)
    node = TemplateLibraryData.from_library(library)
    group, _ = orm.Group.collection.get_or_create(label=f"{GROUP_PREFIX}{name}")
    uuids = {}
    if group_nodes is not None:
        uuids = {tid: group_nodes[tid] for tid in library.ids.tolist() if tid in group_nodes}
    elif store_structures:
        new_nodes = []
        for i, tid in enumerate(library.ids.tolist()):
            s = atoms_to_structure(library.atoms(i))
            s.label = tid[:255]
            s.base.extras.set("template_id", tid)
            s.store()
            uuids[tid] = s.uuid
            new_nodes.append(s)
        group.add_nodes(new_nodes)
    node.base.attributes.set("structure_uuids", uuids)
    node.base.attributes.set("group_label", group.label)
    node.store()
    group.add_nodes([node])
    return node
