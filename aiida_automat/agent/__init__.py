"""The agent: which step of the pipeline runs next. It decides; it never computes science."""

from .actions import ACTIONS, Decision, validate
from .rules import RulesPolicy
from .state import AgentState, Candidate

__all__ = ["ACTIONS", "AgentState", "Candidate", "Decision", "RulesPolicy", "validate"]
