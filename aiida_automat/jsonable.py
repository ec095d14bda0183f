"""Core result dataclasses travel as JSON (status files, Dict nodes): one conversion for all of them."""

from __future__ import annotations

import dataclasses

import numpy as np


class AsDict:
    """Mixin for dataclasses: ``as_dict()`` with numpy arrays as nested lists."""

    def as_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        return out


def to_json(value):
    """A JSON round trip of ``value`` (numpy scalars and arrays become Python numbers and lists), as the
    Dict nodes of the calcfunctions store it."""
    import json

    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
