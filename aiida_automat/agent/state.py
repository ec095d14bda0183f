"""The agent's view of a reconstruction: a small, JSON-round-trippable summary.

Policies see only this summary (never arrays), so a decision can be stored as a node, replayed, and given
to an LLM as text. The WorkChain updates it after every action from the action's outputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


#: weight of ln(retrieval probability) next to the verification score when choosing among candidates
RETRIEVAL_WEIGHT = 0.002
#: the retrieval posterior counts no lower than this in the merit (see ``AgentState.merit``): at most
#: RETRIEVAL_WEIGHT·ln(10³) = 0.014 of verification score, half of what the verification's own contrast term
#: (``reconstruct.scoring.CONTRAST_MAX_NATS``) can cost
RETRIEVAL_P_FLOOR = 1e-3
#: verified candidates of another formula within this verification score of the answer are reported as
#: alternatives the image does not rule out (Si vs SiH, Mg(OH)2 vs MgF2: the hydrogen or one unit of Z is
#: not visible); see ``AgentState.alternatives``
ALTERNATIVE_MARGIN = 0.005
#: a best verification score below this makes the rules policy widen the retrieval (``rule_retrieve_wider``):
#: to 2k candidates, and if the best is still below it, to WIDEST_K
WIDEN_BELOW = 0.97
WIDEST_K = 50
#: default step budget: the rules' longest path (lattice, retrieval widened twice to WIDEST_K candidates, each
#: reconstructed and verified, relaxation, DFT, finish) fits in it; it stops a policy that loops
MAX_STEPS = 120


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
    max_steps: int = MAX_STEPS
    default_k: int = 5
    accept_score: float = 0.5
    widen_below: float | None = WIDEN_BELOW  # rules: a best score below this widens the search (None: never)
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

    def merit(self, index: int) -> float | None:
        """Verification score plus ``RETRIEVAL_WEIGHT``·ln(retrieval probability) of a verified candidate.

        Same-prototype look-alikes (Ga/Al, P/SiS, AlCl/KC2) verify within a few 10⁻³ of each other, while
        the retrieval posterior — which carries the pixel-size, strain and contrast priors — often tells
        them apart. Weighing a factor e of posterior like 0.002 of verification score made 14 of the 40
        selection failures of the 480-image benchmark right (8 with verification alone) and changed none
        of 40 sampled successes; 0.005 and more start changing successes (``benchmarks/selection.py``).
        Templates given by hand have probability 1: no effect.

        The posterior's tail is floored at ``RETRIEVAL_P_FLOOR`` (10⁻³). Before the verification had its own
        absolute-contrast term the far tail was the only place the calibrated contrast entered (Ca3SiBr2 ADF vs
        BiTeI, whose I columns make the image too bright), and a floor at 0.03 cost that image; now the contrast
        counts in the verification score, and the retrieval posterior's tail below 10⁻³ mostly measures where
        the fast model is off for a template (Ca3SiBr2 and Ca2Ge in ADF: χ² growing with dose, p 10⁻⁴–10⁻⁸ for
        a truth that verifies 0.02 better than the answer). Re-chosen from the recorded scores of the 480-image
        run (``benchmarks/merit_selection.py``): floors 10⁻⁶ … 10⁻⁴ change nothing, 10⁻³ and 3·10⁻³ make Ca3SiBr2
        ADF 3·10⁴ and 6·10⁴ right with none wrong, 10⁻² starts losing (Ca3SiBr2 ADF 10⁴); with the widest
        search's candidate lists 10⁻⁴ … 3·10⁻³ give the same choices and 10⁻⁶ loses four (docs/benchmarks.md).
        """
        cand = self.candidates[index]
        if cand.status != "verified" or cand.verification_score is None:
            return None
        p = min(max(float(cand.retrieval_score), RETRIEVAL_P_FLOOR), 1.0)
        return float(cand.verification_score) + RETRIEVAL_WEIGHT * math.log(p)

    def best_candidate(self) -> int | None:
        """Index of the verified candidate with the highest merit whose verification passes the threshold.

        Ties in merit (within 0.001) keep the better retrieval rank, except between polymorphs (same
        formula), which go to the lower energy when energies are known.
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
            mine, theirs = self.merit(i), self.merit(best)
            if mine > theirs + 1e-3:
                best = i
            elif (abs(mine - theirs) <= 1e-3 and cand.formula == other.formula
                  and cand.energy_per_atom is not None and other.energy_per_atom is not None
                  and cand.energy_per_atom < other.energy_per_atom):
                best = i
        return best

    def alternatives(self, chosen: int | None = None, margin: float = ALTERNATIVE_MARGIN) -> list[int]:
        """Verified candidates of another formula that score within ``margin`` of the ``chosen`` one (default:
        the best) and pass the acceptance threshold, best first and one per formula: what the user should know
        the image cannot exclude. Polymorphs of the chosen formula are not listed (the energy ranks them)."""
        chosen = self.best_candidate() if chosen is None else chosen
        if chosen is None or self.candidates[chosen].verification_score is None:
            return []
        ref = self.candidates[chosen]
        out = [i for i, c in enumerate(self.candidates)
               if i != chosen and c.status == "verified" and c.verification_score is not None
               and c.verification_score >= self.accept_score and c.formula != ref.formula
               and c.verification_score >= ref.verification_score - margin]
        best_per_formula: dict[str, int] = {}
        for i in sorted(out, key=lambda i: -self.candidates[i].verification_score):
            best_per_formula.setdefault(self.candidates[i].formula, i)
        return list(best_per_formula.values())

    def denoised(self, setting: str, ok: bool = True) -> "AgentState":
        """The state after a ``denoise`` action on the raw image: ``setting`` is tried; the current image
        becomes the denoised one (``ok``), the raw one again (``none``), or stays (a failed denoise).
        The WorkChain and the in-process benchmark loop both apply it, so they cannot drift apart."""
        tried = self.replace(denoise_settings_tried=self.denoise_settings_tried + (setting,))
        if setting == "none":
            return tried.replace(current_image="raw")
        return tried.replace(current_image=setting) if ok else tried

    def measuring_lattice(self) -> "AgentState":
        """The state when the lattice is measured on the current image (the rules read which were tried)."""
        return self.replace(lattice_images_tried=self.lattice_images_tried + (self.current_image,))

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
