"""An LLM policy over any OpenAI-compatible endpoint (OpenAI, DeepSeek, vLLM, Ollama, ...).

The model gets the state summary as JSON and one tool per action; it must answer with exactly one tool
call. Whatever comes back — no tool call, unknown action, malformed JSON, an impossible move, a timeout,
a refused connection — is recorded and the rules policy decides that step instead, so an LLM can make the
run smarter but never break it. Temperature 0; the reply is kept verbatim for provenance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import AgentError
from .actions import ACTIONS, ARGUMENTS, DESCRIPTIONS, Decision, validate
from .rules import RulesPolicy
from .state import AgentState

SYSTEM_PROMPT = (
    "You steer the reconstruction of a 2D crystal structure from a STEM image. You never compute science "
    "yourself; you choose the next action by calling exactly one tool. Typical order: denoise if noisy, "
    "measure_lattice, retrieve, then reconstruct and verify candidates in rank order, relax the best verified "
    "candidate, optionally dft_check, then finish. Use give_up only when nothing sensible is left."
)


def tool_definitions() -> list[dict]:
    tools = []
    for action in ACTIONS:
        props = {k: dict(v) for k, v in ARGUMENTS[action].items()}
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": action,
                    "description": DESCRIPTIONS[action],
                    "parameters": {"type": "object", "properties": props, "additionalProperties": False},
                },
            }
        )
    return tools


@dataclass(frozen=True)
class LLMSettings:
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = None
    timeout_s: float = 30.0
    max_retries: int = 1

    @classmethod
    def from_env(cls, **overrides) -> "LLMSettings":
        """Options win over ``AUTOMAT_LLM_MODEL``/``OPENAI_BASE_URL``/``OPENAI_API_KEY``."""
        values = {
            "model": os.environ.get("AUTOMAT_LLM_MODEL", cls.model),
            "base_url": os.environ.get("OPENAI_BASE_URL"),
            "api_key": os.environ.get("OPENAI_API_KEY"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def parse_reply(message) -> Decision:
    """The single tool call of a chat-completion message as a Decision, or ``AgentError``."""
    calls = getattr(message, "tool_calls", None) or []
    if len(calls) != 1:
        text = (getattr(message, "content", None) or "")[:200]
        raise AgentError(f"expected exactly one tool call, got {len(calls)} (text: {text!r})")
    call = calls[0]
    name = getattr(call.function, "name", None)
    raw_args = getattr(call.function, "arguments", None) or "{}"
    try:
        arguments = json.loads(raw_args)
    except (TypeError, ValueError) as exc:
        raise AgentError(f"tool arguments are not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise AgentError("tool arguments must be a JSON object")
    reason = arguments.pop("reason", "") if name != "give_up" else arguments.get("reason", "")
    return Decision(action=str(name), arguments=arguments, reason=str(reason or "llm choice"), policy="llm")


class LLMPolicy:
    name = "llm"

    def __init__(self, settings: LLMSettings | None = None, fallback=None):
        self.settings = settings or LLMSettings.from_env()
        self.fallback = fallback or RulesPolicy()
        self._client = None

    def client(self):
        if self._client is None:
            try:
                import openai
            except ImportError as exc:  # pragma: no cover - openai is a dependency
                raise AgentError("the llm policy needs the 'openai' package") from exc
            self._client = openai.OpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key or "not-needed",
                timeout=self.settings.timeout_s,
                max_retries=self.settings.max_retries,
            )
        return self._client

    def ask(self, state: AgentState) -> tuple[Decision, str]:
        response = self.client().chat.completions.create(
            model=self.settings.model,
            temperature=0,
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": json.dumps(state.as_dict(), default=str)},
            ],
            tools=tool_definitions(),
            tool_choice="required",
        )
        raw = response.model_dump_json() if hasattr(response, "model_dump_json") else str(response)
        if not getattr(response, "choices", None):
            raise AgentError("the reply has no choices")
        decision = parse_reply(response.choices[0].message)
        return decision, raw

    def decide(self, state: AgentState) -> Decision:
        raw = None
        try:
            decision, raw = self.ask(state)
            decision = validate(state, decision)
            return Decision(
                action=decision.action,
                arguments=decision.arguments,
                reason=decision.reason,
                policy=self.name,
                model=self.settings.model,
                raw_reply=raw,
            )
        except Exception as exc:  # noqa: BLE001 - any LLM failure falls back to the rules
            fallback = self.fallback.decide(state)
            why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            return Decision(
                action=fallback.action,
                arguments=fallback.arguments,
                reason=f"llm rejected ({why}); {fallback.reason}",
                policy=f"{self.name}->rules",
                model=self.settings.model,
                raw_reply=raw,
            )


def get_policy(name: str, **settings):
    if name == "rules":
        return RulesPolicy()
    if name == "llm":
        return LLMPolicy(LLMSettings.from_env(**settings))
    raise AgentError(f"unknown policy {name!r}: use 'rules' or 'llm'")
