"""The LLM policy with the real openai client over HTTP to a scripted local server."""

import pytest

from aiida_automat.agent import AgentState, Candidate
from aiida_automat.agent.llm import LLMPolicy, LLMSettings, get_policy
from aiida_automat.errors import AgentError
from tests.fake_openai import FakeOpenAI, delay, garbage, text_reply, tool_call

LATTICE = {"a": 3.18, "b": 3.18, "gamma": 120.0}


def policy_for(server, timeout=5.0):
    return LLMPolicy(LLMSettings(model="scripted", base_url=server.base_url, api_key="k", timeout_s=timeout, max_retries=0))


def test_valid_tool_call_is_followed_and_recorded():
    state = AgentState(noise_level=0.05)
    with FakeOpenAI([tool_call("measure_lattice", {})]) as server:
        decision = policy_for(server).decide(state)
    assert decision.action == "measure_lattice"
    assert decision.policy == "llm" and decision.model == "scripted"
    assert "measure_lattice" in decision.raw_reply
    request = server.requests[0]
    assert request["temperature"] == 0
    assert {t["function"]["name"] for t in request["tools"]} >= {"retrieve", "finish", "give_up"}


def test_llm_may_disagree_with_rules_when_valid():
    # Rules would reconstruct candidate 0; the LLM picks candidate 1, which is allowed.
    state = AgentState(lattice=LATTICE, retrieve_attempts=1,
                       candidates=(Candidate("a", "MoS2", 0.9), Candidate("b", "WS2", 0.85)))
    with FakeOpenAI([tool_call("reconstruct", {"candidate": 1})]) as server:
        decision = policy_for(server).decide(state)
    assert (decision.action, decision.arguments["candidate"], decision.policy) == ("reconstruct", 1, "llm")


@pytest.mark.parametrize(
    "reply, why",
    [
        (tool_call("relax", {"potential": "auto"}), "needs a verified candidate"),
        (tool_call("teleport", {}), "unknown action"),
        (tool_call("retrieve", "{k: five", raw=True), "not JSON"),
        (tool_call("reconstruct", {"candidate": 7}), "does not exist"),
        (text_reply("I think you should measure the lattice."), "exactly one tool call"),
        (garbage(), ""),
        (garbage("boom", status=500), ""),
    ],
)
def test_bad_replies_fall_back_to_rules(reply, why):
    state = AgentState(noise_level=0.05)
    with FakeOpenAI([reply]) as server:
        decision = policy_for(server).decide(state)
    assert decision.action == "measure_lattice"  # what the rules say
    assert decision.policy == "llm->rules"
    assert why in decision.reason


def test_timeout_falls_back():
    state = AgentState(noise_level=0.05)
    with FakeOpenAI([delay(3.0)]) as server:
        decision = policy_for(server, timeout=0.5).decide(state)
    assert decision.policy == "llm->rules"
    assert "Timeout" in decision.reason or "timed out" in decision.reason.lower()


def test_unreachable_endpoint_falls_back():
    policy = LLMPolicy(LLMSettings(model="m", base_url="http://127.0.0.1:9/v1", api_key="k", timeout_s=1, max_retries=0))
    decision = policy.decide(AgentState(noise_level=0.05))
    assert decision.policy == "llm->rules" and decision.action == "measure_lattice"


def test_unknown_policy_name():
    with pytest.raises(AgentError, match="unknown policy"):
        get_policy("oracle")
