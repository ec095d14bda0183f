"""The agent's view of a reconstruction: a small, JSON-round-trippable summary.

Policies see only this summary (never arrays), so a decision can be stored as a node, replayed, and given
to an LLM as text. The WorkChain updates it after every action from the action's outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Candidate:
    template_id: str
    formula: str
    retrieval_score: float
    status: str = "pending"  # pending | reconstructed | verified | failed
    verification_score: float | None = None
    energy_per_atom: float | None = None
    message: str = ""


@dataclass(frozen=True)
class AgentState:
    step: int = 0
    max_steps: int = 30
    default_k: int = 5
    accept_score: float = 0.5
    noise_level: float | None = None
    can_denoise: bool = True
    denoise_settings_tried: tuple[str, ...] = ()
    current_image: str = "raw"  # "raw", or the denoise setting of the image the actions now use
    lattice_images_tried: tuple[str, ...] = ()
    lattice: dict | None = None
    lattice_failed: bool = False
    lattice_attempts: int = 0
    retrieve_attempts: int = 0
    candidates: tuple[Candidate, ...] = ()
    relax_requested: bool = True
    relaxed: bool = False
    relax_failed: bool = False
    dft_requested: bool = False
    dft_available: bool = False
    dft_done: bool = False
    done: bool = False
    outcome: str | None = None
    history: tuple[str, ...] = ()

    def best_candidate(self) -> int | None:
        """Index of the verified candidate with the highest score above the acceptance threshold.

        Ties in verification score (within 0.001) between polymorphs (same formula) go to the lower
        energy when energies are known; otherwise the better retrieval rank.
        """
        best = None
        for i, cand in enumerate(self.candidates):
            if cand.status != "verified" or cand.verification_score is None:
                continue
            if cand.verification_score < self.accept_score:
                continue
            if best is None:
                best = i
                continue
            other = self.candidates[best]
            if cand.verification_score > other.verification_score + 1e-3:
                best = i
            elif (abs(cand.verification_score - other.verification_score) <= 1e-3 and cand.formula == other.formula
                  and cand.energy_per_atom is not None and other.energy_per_atom is not None
                  and cand.energy_per_atom < other.energy_per_atom):
                best = i
        return best

    def replace(self, **changes) -> "AgentState":
        return dataclasses.replace(self, **changes)

    def with_candidate(self, index: int, **changes) -> "AgentState":
        cands = list(self.candidates)
        cands[index] = dataclasses.replace(cands[index], **changes)
        return self.replace(candidates=tuple(cands))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AgentState":
        # A WorkChain reloaded from its checkpoint hands back AttributeDicts, which dataclasses.asdict
        # cannot rebuild: make every mapping a plain dict again.
        data = _plain(data)
        data["candidates"] = tuple(Candidate(**c) for c in data.get("candidates", ()))
        for key in ("denoise_settings_tried", "lattice_images_tried", "history"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
