"""The rules policy on crafted states: each row of the decision table, and the validation gate."""

import dataclasses
import math

import pytest

from aiida_automat.agent import AgentState, Candidate, Decision, RulesPolicy, validate
from aiida_automat.errors import AgentError

LATTICE = {"a": 3.18, "b": 3.18, "gamma": 120.0}


def decide(**state):
    return RulesPolicy().decide(AgentState(**state))


def test_noisy_image_is_measured_raw_first():
    """Denoising first does not help the cell-averaged reconstruction: the raw image is measured first."""
    d = decide(noise_level=0.4)
    assert d.action == "measure_lattice" and d.reason.startswith("[lattice]")


def test_clean_image_goes_to_lattice():
    assert decide(noise_level=0.05).action == "measure_lattice"


def test_failed_lattice_denoises_auto_then_strong_then_gives_up():
    d = decide(lattice_failed=True, lattice_attempts=1, lattice_images_tried=("raw",))
    assert (d.action, d.arguments["setting"]) == ("denoise", "auto")
    d = decide(lattice_failed=True, lattice_attempts=1, lattice_images_tried=("raw",),
               denoise_settings_tried=("auto",), current_image="auto")
    assert d.action == "measure_lattice" and "'auto'" in d.reason
    d = decide(lattice_failed=True, lattice_attempts=2, lattice_images_tried=("raw", "auto"),
               denoise_settings_tried=("auto",), current_image="auto")
    assert (d.action, d.arguments["setting"]) == ("denoise", "strong")
    d = decide(lattice_failed=True, lattice_attempts=3, lattice_images_tried=("raw", "auto", "strong"),
               denoise_settings_tried=("auto", "strong"), current_image="strong")
    assert d.action == "give_up"


def test_failed_denoise_goes_to_the_next_setting():
    """A denoise that failed leaves the raw image current; it is not measured twice."""
    d = decide(lattice_failed=True, lattice_attempts=1, lattice_images_tried=("raw",), denoise_settings_tried=("auto",))
    assert (d.action, d.arguments["setting"]) == ("denoise", "strong")


def test_no_denoiser_gives_up_after_the_raw_image():
    d = decide(lattice_failed=True, lattice_attempts=1, lattice_images_tried=("raw",), can_denoise=False)
    assert d.action == "give_up"


def test_candidates_in_rank_order():
    cands = (Candidate("a", "MoS2", 0.9), Candidate("b", "WS2", 0.8))
    d = decide(lattice=LATTICE, candidates=cands, retrieve_attempts=1)
    assert (d.action, d.arguments["candidate"]) == ("reconstruct", 0)
    cands = (Candidate("a", "MoS2", 0.9, status="reconstructed"), cands[1])
    d = decide(lattice=LATTICE, candidates=cands, retrieve_attempts=1)
    assert (d.action, d.arguments["candidate"]) == ("verify", 0)


def test_failed_candidate_leads_to_next():
    cands = (Candidate("a", "MoS2", 0.9, status="failed"), Candidate("b", "WS2", 0.8))
    d = decide(lattice=LATTICE, candidates=cands, retrieve_attempts=1)
    assert (d.action, d.arguments["candidate"]) == ("reconstruct", 1)


def test_every_candidate_is_verified_and_the_best_wins():
    cands = (
        Candidate("a", "MoS2", 0.90, status="verified", verification_score=0.95),
        Candidate("b", "WS2", 0.88),
        Candidate("c", "hBN", 0.30),
    )
    d = decide(lattice=LATTICE, candidates=cands, retrieve_attempts=1, relax_requested=False)
    assert (d.action, d.arguments["candidate"]) == ("reconstruct", 1)
    cands = (cands[0], Candidate("b", "WS2", 0.88, status="verified", verification_score=0.7),
             Candidate("c", "hBN", 0.30, status="verified", verification_score=0.97))
    d = decide(lattice=LATTICE, candidates=cands, retrieve_attempts=1, relax_requested=False)
    assert (d.action, d.arguments["candidate"]) == ("finish", 2)


def test_all_below_threshold_widens_then_gives_up():
    cands = (Candidate("a", "MoS2", 0.9, status="verified", verification_score=0.2),)
    d = decide(lattice=LATTICE, candidates=cands, retrieve_attempts=1, accept_score=0.5)
    assert d.action == "retrieve" and d.arguments["k"] == 15
    d = decide(lattice=LATTICE, candidates=cands, retrieve_attempts=2, accept_score=0.5)
    assert d.action == "give_up"


def test_relax_then_dft_then_finish():
    cands = (Candidate("a", "MoS2", 0.9, status="verified", verification_score=0.99),)
    base = dict(lattice=LATTICE, candidates=cands, retrieve_attempts=1, dft_requested=True, dft_available=True)
    assert decide(**base).action == "relax"
    assert decide(**base, relaxed=True).action == "dft_check"
    assert decide(**base, relaxed=True, dft_done=True).action == "finish"
    # DFT requested but no code: finish instead of an impossible action
    assert decide(**{**base, "dft_available": False}, relaxed=True).action == "finish"


def test_budget():
    assert decide(step=30, max_steps=30).action == "give_up"


@pytest.mark.parametrize(
    "decision, message",
    [
        (Decision("dance"), "unknown action"),
        (Decision("reconstruct", {"candidate": 3}), "does not exist"),
        (Decision("reconstruct", {"candidate": "0"}), "must be an integer"),
        (Decision("verify", {"candidate": 0}), "must be reconstructed"),
        (Decision("relax"), "needs a verified candidate"),
        (Decision("retrieve", {"k": 5}), "needs a measured lattice"),
        (Decision("measure_lattice", {"bogus": 1}), "takes no argument"),
        (Decision("dft_check"), "needs a relaxed structure"),
    ],
)
def test_validation_rejects_impossible_moves(decision, message):
    state = AgentState(candidates=(Candidate("a", "MoS2", 0.9),))
    with pytest.raises(AgentError, match=message):
        validate(state, decision)


def test_state_round_trip():
    state = AgentState(lattice=LATTICE, candidates=(Candidate("a", "MoS2", 0.9),), history=("x",))
    assert AgentState.from_dict(state.as_dict()) == state


def test_state_survives_a_checkpoint_round_trip():
    """A reloaded WorkChain gives the state back as nested AttributeDicts; the policy must still see a state."""
    from aiida.common.extendeddicts import AttributeDict

    from aiida_automat.agent.state import AgentState, Candidate

    state = AgentState(lattice={"a": 3.18, "b": 3.18, "gamma": 120.0}, candidates=(Candidate("t0", "MoS2", 0.9),))
    raw = state.as_dict()
    reloaded = AttributeDict({k: AttributeDict(v) if isinstance(v, dict) else v for k, v in raw.items()})
    reloaded["candidates"] = [AttributeDict(c) for c in raw["candidates"]]
    again = AgentState.from_dict(reloaded)
    assert again == state
    assert again.as_dict() == raw


def test_retrieval_posterior_breaks_near_ties_between_look_alikes():
    """Look-alikes verify within a few 10⁻³; the retrieval posterior (calibration/contrast priors) decides."""
    from aiida_automat.agent.state import AgentState, Candidate

    lookalike = Candidate("Se", "Se", 0.10, status="verified", verification_score=0.9950)
    truth = Candidate("Ga", "Ga", 0.80, status="verified", verification_score=0.9930)
    assert AgentState(candidates=(lookalike, truth)).best_candidate() == 1
    # a clearly better verification still wins over the posterior
    better = Candidate("Se", "Se", 0.10, status="verified", verification_score=0.9990)
    assert AgentState(candidates=(better, truth)).best_candidate() == 0
    # hand-given templates (probability 1) are chosen by verification alone
    a = Candidate("t0", "MoS2", 1.0, status="verified", verification_score=0.990)
    b = Candidate("t1", "MoS2", 1.0, status="verified", verification_score=0.995)
    assert AgentState(candidates=(a, b)).best_candidate() == 1
    # the threshold applies to the verification score itself
    low = Candidate("t2", "WS2", 1.0, status="verified", verification_score=0.85)
    assert AgentState(candidates=(low,), accept_score=0.9).best_candidate() is None


def test_retrieval_posterior_tail_is_floored():
    """Below RETRIEVAL_P_FLOOR the posterior stops counting: a truth the fast model ranks at p 10⁻⁸ that
    verifies 0.02 better than the answer (Ca2Ge vs NaBr in ADF) wins; above the floor the posterior still counts."""
    from aiida_automat.agent.state import RETRIEVAL_P_FLOOR, RETRIEVAL_WEIGHT, AgentState, Candidate

    answer = Candidate("NaBr", "NaBr", 0.97, status="verified", verification_score=0.961)
    truth = Candidate("Ca2Ge", "Ca2Ge", 3e-8, status="verified", verification_score=0.983)
    state = AgentState(candidates=(answer, truth))
    assert state.best_candidate() == 1
    assert state.merit(1) == pytest.approx(0.983 + RETRIEVAL_WEIGHT * math.log(RETRIEVAL_P_FLOOR))
    assert AgentState(candidates=(answer, dataclasses.replace(truth, retrieval_score=1e-12))).merit(1) == state.merit(1)
    above = Candidate("Ca2Ge", "Ca2Ge", 10 * RETRIEVAL_P_FLOOR, status="verified", verification_score=0.983)
    assert AgentState(candidates=(answer, above)).merit(1) > state.merit(1)


def test_alternatives_are_other_formulas_the_image_does_not_rule_out():
    cands = (
        Candidate("si", "Si", 0.6, status="verified", verification_score=0.996),
        Candidate("sih", "SiH", 0.3, status="verified", verification_score=0.999),
        Candidate("si-2", "Si", 0.05, status="verified", verification_score=0.9975),  # best of its formula
        Candidate("alp", "AlP", 0.04, status="verified", verification_score=0.990),  # clearly worse
        Candidate("gap", "GaP", 0.01, status="failed"),
    )
    state = AgentState(lattice=LATTICE, candidates=cands, accept_score=0.9)
    best = state.best_candidate()
    assert cands[best].template_id == "sih"
    assert [cands[i].template_id for i in state.alternatives()] == ["si-2"]  # one per formula
    # relative to an explicitly chosen candidate (an LLM may finish on another one); its polymorph is not listed
    assert [cands[i].template_id for i in state.alternatives(chosen=0)] == ["sih"]
    assert state.alternatives(margin=0.0) == []
    assert AgentState(lattice=LATTICE, candidates=cands, accept_score=0.999).alternatives() == []


def test_a_mediocre_best_widens_the_search_once():
    """Best verified at 0.95 (< widen_below): retrieve 2k once; at 0.99, or after the wider search, finish."""
    mediocre = (Candidate("a", "LiCuO", 0.9, status="verified", verification_score=0.95),
                Candidate("b", "AlCl", 0.1, status="verified", verification_score=0.94))
    d = decide(lattice=LATTICE, candidates=mediocre, retrieve_attempts=1, default_k=2, relax_requested=False)
    assert (d.action, d.arguments["k"]) == ("retrieve", 4) and d.reason.startswith("[retrieve_wider]")
    d = decide(lattice=LATTICE, candidates=mediocre, retrieve_attempts=2, default_k=2, relax_requested=False)
    assert d.action == "finish"
    d = decide(lattice=LATTICE, candidates=mediocre, retrieve_attempts=1, widen_below=None, relax_requested=False)
    assert d.action == "finish"
    d = decide(lattice=LATTICE, candidates=mediocre, retrieve_attempts=1, default_k=5, relax_requested=False)
    assert d.action == "finish"  # 2 of k=5 came back: the retrieval has nothing more to give
    good = (Candidate("a", "LiCuO", 0.9, status="verified", verification_score=0.99),)
    assert decide(lattice=LATTICE, candidates=good, retrieve_attempts=1, relax_requested=False).action == "finish"
    # the new candidates of the wider search are reconstructed before anything is finished
    wider = mediocre + (Candidate("c", "SiC2O2", 0.01),)
    d = decide(lattice=LATTICE, candidates=wider, retrieve_attempts=2, relax_requested=False)
    assert (d.action, d.arguments["candidate"]) == ("reconstruct", 2)


def test_a_still_mediocre_best_widens_once_more_to_widest_k():
    """After the 2k search the best is still mediocre: retrieve WIDEST_K once, then finish."""
    from aiida_automat.agent.state import WIDEST_K

    mediocre = tuple(Candidate(f"t{i}", "NaBr" if i == 0 else f"X{i}", 0.1, status="verified",
                               verification_score=0.96 - 0.01 * i) for i in range(10))
    d = decide(lattice=LATTICE, candidates=mediocre, retrieve_attempts=2, default_k=5, relax_requested=False)
    assert (d.action, d.arguments["k"]) == ("retrieve", WIDEST_K) and d.reason.startswith("[retrieve_wider]")
    widest = mediocre + tuple(Candidate(f"u{i}", "Ca2Ge", 1e-8) for i in range(WIDEST_K - 10))
    d = decide(lattice=LATTICE, candidates=widest, retrieve_attempts=2, default_k=5, relax_requested=False)
    assert (d.action, d.arguments["candidate"]) == ("reconstruct", 10)  # the new ones are verified first
    done = tuple(c if c.status == "verified" else Candidate(c.template_id, c.formula, c.retrieval_score,
                                                            status="verified", verification_score=0.5)
                 for c in widest)
    assert decide(lattice=LATTICE, candidates=done, retrieve_attempts=3, default_k=5,
                  relax_requested=False).action == "finish"
    # the first search gave fewer than 2k: the retrieval has nothing more to give
    assert decide(lattice=LATTICE, candidates=mediocre[:7], retrieve_attempts=2, default_k=5,
                  relax_requested=False).action == "finish"
    # the default step budget holds the whole widest search (each candidate: reconstruct + verify)
    assert AgentState().max_steps >= 4 + 2 * WIDEST_K
