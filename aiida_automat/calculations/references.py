"""Elemental references μᵢ in AiiDA: computed once per model and element, cached in a Group.

``compute_elemental_references`` is a calcfunction (inputs: the model node, the element list, settings;
outputs: one Dict per element) so every μ has provenance. ``get_elemental_references(model, elements)``
looks up the Group ``automat/references/<name>/<sha256>`` and only computes the elements that are
missing; the returned Dict nodes go straight into ``RelaxCalculation``'s ``references`` namespace.
The calcfunction runs in-process (elemental cells are small; CPU is enough).
"""

from __future__ import annotations

from aiida import orm
from aiida.engine import calcfunction

from ..data.model import ModelCheckpointData

GROUP_PREFIX = "automat/references"


def group_label(model: ModelCheckpointData) -> str:
    return f"{GROUP_PREFIX}/{model.name}/{model.sha256}"


@calcfunction
def compute_elemental_references(model: ModelCheckpointData, elements: orm.List, parameters: orm.Dict):
    """Relax the candidate reference structures of each element with ``model``; one Dict per element."""
    from ..energy.potentials import load_potential
    from ..energy.references import REFERENCE_SETTINGS, compute_reference
    from ..energy.relax import RelaxSettings

    params = parameters.get_dict()
    settings = RelaxSettings(**{**REFERENCE_SETTINGS.as_dict(), **params.get("relax", {})})
    with model.as_path() as path:
        calculator, info = load_potential(
            model.name,
            str(path),
            version=model.version,
            expected_sha256=model.sha256,
            device=params.get("device", "cpu"),
            num_threads=params.get("num_threads"),
        )
        outputs = {}
        for symbol in elements.get_list():
            ref = compute_reference(symbol, calculator, settings)
            outputs[symbol] = orm.Dict(
                {
                    **ref.as_dict(),
                    "model_name": info.name,
                    "model_version": info.version,
                    "model_sha256": info.sha256,
                    "settings": settings.as_dict(),
                }
            )
    return outputs


def cached_references(model: ModelCheckpointData) -> dict:
    """{symbol: Dict} already computed for this model (the oldest node wins if duplicated)."""
    try:
        group = orm.Group.collection.get(label=group_label(model))
    except Exception:  # noqa: BLE001 - NotExistent
        return {}
    found = {}
    nodes = sorted((n for n in group.nodes if isinstance(n, orm.Dict)), key=lambda n: n.ctime)
    for node in nodes:
        symbol = node.get("element")
        if symbol and symbol not in found and node.get("model_sha256") == model.sha256:
            found[symbol] = node
    return found


def get_elemental_references(model: ModelCheckpointData, elements, *, parameters: dict | None = None) -> dict:
    """{symbol: Dict} for ``elements``, computing (once per model) only those not yet cached."""
    if not model.is_stored:
        model.store()
    wanted = sorted(set(elements))
    found = cached_references(model)
    missing = [s for s in wanted if s not in found]
    if missing:
        outputs = compute_elemental_references(model, orm.List(missing), orm.Dict(parameters or {}))
        group, _ = orm.Group.collection.get_or_create(label=group_label(model))
        group.add_nodes(list(outputs.values()))
        found.update(outputs)
    return {s: found[s] for s in wanted}


def references_mu(references: dict) -> dict:
    """{symbol: μ} from the reference Dict nodes."""
    return {symbol: float(node["energy_per_atom"]) for symbol, node in references.items()}
