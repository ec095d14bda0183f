"""What the agent may do, and which of those moves are possible in a given state.

The agent only chooses among these actions; it never computes science. ``validate`` is the single gate
every policy's choice passes through, so an LLM that invents an action, picks a candidate that does not
exist or wants to relax before there is a structure is rejected the same way as a buggy rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import AgentError

ACTIONS = (
    "denoise",
    "measure_lattice",
    "retrieve",
    "reconstruct",
    "verify",
    "relax",
    "dft_check",
    "finish",
    "give_up",
)

#: JSON schema of each action's arguments (also the tool definitions given to an LLM).
ARGUMENTS = {
    "denoise": {"setting": {"type": "string", "enum": ["auto", "light", "strong", "none"]}},
    "measure_lattice": {},
    "retrieve": {"k": {"type": "integer", "minimum": 1, "maximum": 50}},
    "reconstruct": {"candidate": {"type": "integer", "minimum": 0}},
    "verify": {"candidate": {"type": "integer", "minimum": 0}},
    "relax": {"potential": {"type": "string"}},
    "dft_check": {},
    "finish": {"candidate": {"type": "integer", "minimum": 0}},
    "give_up": {"reason": {"type": "string"}},
}

DESCRIPTIONS = {
    "denoise": "Denoise the raw image with the mixture-of-experts denoiser; later actions use the result "
               "(for when no lattice is found in the raw image; 'none' goes back to the raw image).",
    "measure_lattice": "Measure the 2D lattice, scan distortion and pixel-size check from the (denoised) image.",
    "retrieve": "Rank the k best templates of the library for the measured lattice and image.",
    "reconstruct": "Reconstruct the structure of candidate i from the image (columns, registration, species).",
    "verify": "Re-simulate reconstructed candidate i and score its agreement with the image.",
    "relax": "Relax the best verified structure with an ML potential and compute its formation energy.",
    "dft_check": "Check the ML energy of the relaxed structure with Quantum ESPRESSO.",
    "finish": "Stop and report the given verified candidate as the result.",
    "give_up": "Stop without a result, with a reason.",
}


@dataclass(frozen=True)
class Decision:
    """A chosen action with its arguments and the policy's reason."""

    action: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    policy: str = "rules"
    model: str | None = None
    raw_reply: str | None = None

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["arguments"] = dict(self.arguments)
        return out


def _candidate(state, arguments) -> int:
    value = arguments.get("candidate")
    if not isinstance(value, int) or isinstance(value, bool):
        raise AgentError("argument 'candidate' must be an integer")
    if not 0 <= value < len(state.candidates):
        raise AgentError(f"candidate {value} does not exist (there are {len(state.candidates)})")
    return value


def validate(state, decision: Decision) -> Decision:
    """Return the decision if it is possible in ``state``; raise ``AgentError`` saying why not."""
    action = decision.action
    if action not in ACTIONS:
        raise AgentError(f"unknown action {action!r}")
    args = dict(decision.arguments or {})
    allowed = set(ARGUMENTS[action])
    extra = set(args) - allowed
    if extra:
        raise AgentError(f"action {action} takes no argument(s) {', '.join(sorted(extra))}")
    if state.done:
        raise AgentError("the run is already finished")
    if action == "denoise":
        setting = args.get("setting", "auto")
        if setting not in ARGUMENTS["denoise"]["setting"]["enum"]:
            raise AgentError(f"unknown denoise setting {setting!r}")
        if not state.can_denoise:
            raise AgentError("no denoiser is available for this run")
    elif action == "retrieve":
        if state.lattice is None:
            raise AgentError("retrieve needs a measured lattice")
        k = args.get("k", state.default_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 50:
            raise AgentError("k must be an integer between 1 and 50")
    elif action == "reconstruct":
        i = _candidate(state, args)
        if state.candidates[i].status != "pending":
            raise AgentError(f"candidate {i} is already {state.candidates[i].status}")
    elif action == "verify":
        i = _candidate(state, args)
        if state.candidates[i].status != "reconstructed":
            raise AgentError(f"candidate {i} must be reconstructed before it is verified (it is {state.candidates[i].status})")
    elif action == "relax":
        if state.best_candidate() is None:
            raise AgentError("relax needs a verified candidate")
        if state.relaxed:
            raise AgentError("the structure is already relaxed")
    elif action == "dft_check":
        if not state.relaxed:
            raise AgentError("the DFT check needs a relaxed structure")
        if not state.dft_available:
            raise AgentError("no pw.x code is configured for the DFT check")
        if state.dft_done:
            raise AgentError("the DFT check has already run")
    elif action == "finish":
        best = state.best_candidate()
        if best is None:
            raise AgentError("finish needs a verified candidate above the acceptance threshold")
        if "candidate" in args:
            i = _candidate(state, args)
            if state.candidates[i].status != "verified":
                raise AgentError(f"candidate {i} is not verified")
    elif action == "measure_lattice" and state.lattice is not None and not state.lattice_failed:
        raise AgentError("the lattice is already measured")
    return dataclasses.replace(decision, arguments=args)
