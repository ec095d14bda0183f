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
    "yourself; you choose the next action by calling exactly one tool. Typical order: measure_lattice on "
    "the raw image (denoise only when no lattice is found), retrieve, then reconstruct and verify candidates in rank order, relax the best verified "
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


def _field(obj, name: str):
    """``obj.name`` or ``obj[name]``: the client builds reply objects without validating them, so a server
    that sends odd JSON can leave plain dicts, lists or numbers where a tool call should be."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _check_arguments(action: str, arguments: dict) -> None:
    """The tool's JSON schema (``ARGUMENTS``), enforced: an LLM that sends ``{"potential": 5}`` or
    ``{"k": "five"}`` is rejected here, not by a crash when the action runs."""
    for key, value in arguments.items():
        schema = ARGUMENTS.get(action, {}).get(key)
        if schema is None:
            continue  # unknown arguments are refused by ``validate`` with the action's own message
        kind = schema.get("type")
        if kind == "string" and not isinstance(value, str):
            raise AgentError(f"argument {key!r} of {action} must be a string, got {type(value).__name__}")
        if kind == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                raise AgentError(f"argument {key!r} of {action} must be an integer, got {type(value).__name__}")
            if value < schema.get("minimum", value) or value > schema.get("maximum", value):
                raise AgentError(f"argument {key!r} of {action} is out of range: {value}")
        if "enum" in schema and value not in schema["enum"]:
            raise AgentError(f"argument {key!r} of {action} must be one of {schema['enum']}, got {value!r}")


def parse_reply(message) -> Decision:
    """The single tool call of a chat-completion message as a Decision, or ``AgentError``.

    Only ``AgentError`` leaves this function, whatever the reply holds (checked by hypothesis in
    ``tests/core/test_fuzz.py``): the fallback to the rules must not depend on which exception a
    malformed reply happens to provoke.
    """
    calls = _field(message, "tool_calls") or []
    if not isinstance(calls, (list, tuple)) or len(calls) != 1:
        text = str(_field(message, "content") or "")[:200]
        count = len(calls) if isinstance(calls, (list, tuple)) else f"a {type(calls).__name__}"
        raise AgentError(f"expected exactly one tool call, got {count} (text: {text!r})")
    function = _field(calls[0], "function")
    name = _field(function, "name")
    if not isinstance(name, str) or not name:
        raise AgentError(f"the tool call has no function name (got {str(name)[:80]!r})")
    raw_args = _field(function, "arguments") or "{}"
    try:
        arguments = json.loads(raw_args)
    except (TypeError, ValueError, RecursionError) as exc:
        raise AgentError(f"tool arguments are not JSON: {str(exc)[:200]}") from None
    if not isinstance(arguments, dict):
        raise AgentError("tool arguments must be a JSON object")
    reason = arguments.pop("reason", "") if name != "give_up" else arguments.get("reason", "")
    _check_arguments(name, arguments)
    return Decision(action=name, arguments=arguments, reason=str(reason or "llm choice")[:500], policy="llm")


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
