"""The agent's decide → act loop in one process, so the benchmark measures the policies the product runs.

``ReconstructionWorkChain`` asks a policy (``agent.rules.RulesPolicy`` or ``agent.llm.LLMPolicy``) for the
next action on an ``AgentState`` summary, runs it as an AiiDA process and updates the summary. Here the same
policies decide on the same summary, and each action is the core call the WorkChain's calcfunction wraps
(``measure_lattice``, ``library.retrieve``, ``reconstruct``, the ``verify_candidate`` ranking score, the
denoiser when one is given — the WorkChain's protocols give the bundled one, which the rules use only when the
raw image shows no lattice — and an optional relaxation), without a database. What differs from the
WorkChain: no DFT check; ``noise_level`` is not given to the policy. ``bench run --daemon`` runs the WorkChain itself.

Compared with ``run_pipeline`` (every top-k candidate scored, the highest ranking score wins), a policy
adds the acceptance threshold (``accept_score``: below it nothing is accepted), the widened retrieval when
no candidate passes, the step budget, and — for the LLM — its own choices, each validated and replaced by
the rules' choice when invalid.
"""

from __future__ import annotations

import time

from ..agent.state import MAX_STEPS, WIDEN_BELOW
from ..errors import AutomatError
from .pipeline import PipelineResult, _measure, _relax, reconstruct_candidate, score_candidate

__all__ = ["run_agent", "trace_line"]


def trace_line(action: str, arguments: dict, policy: str | None) -> str:
    """One decision as ``action(k=v, ...) [policy]``: the in-process and the WorkChain rows read alike."""
    args = ", ".join(f"{k}={v}" for k, v in dict(arguments).items())
    return f"{action}({args}) [{policy}]"


def _denoise(image, model, setting: str):
    from ..denoise import denoise

    return denoise(image, model=model, setting=setting).image


def _trace(result: PipelineResult, decision) -> None:
    result.trace.append(trace_line(decision.action, decision.arguments, decision.policy))


def run_agent(image, library, policy, *, k: int = 5, accept_score: float = 0.9, max_steps: int = MAX_STEPS,
              calculator=None, reconstruct_kw=None, denoiser=None, widen_below=WIDEN_BELOW) -> PipelineResult:
    """Reconstruct ``image`` with ``library`` as the agent ``policy`` decides (``policy.decide(state)``).

    ``result.trace`` lists the decisions; ``result.stage`` says where a give-up happened (lattice /
    retrieval / reconstruction), as for ``run_pipeline``. ``denoiser`` (a ``denoise.DenoiserModel``) makes
    the ``denoise`` action available as in the WorkChain: it always denoises the *raw* image, ``none``
    rolls back, and every later action uses the current image.
    """
    from ..agent.state import AgentState, Candidate
    from ..library.retrieve import retrieve

    state = AgentState(max_steps=max_steps, default_k=k, accept_score=accept_score, widen_below=widen_below,
                       can_denoise=denoiser is not None,
                       relax_requested=calculator is not None)
    result = PipelineResult()
    lat = relaxed_id = None
    templates, recs = [], {}
    raw = image
    while not state.done:
        decision = policy.decide(state)
        _trace(result, decision)
        state = state.replace(step=state.step + 1)
        action, args = decision.action, dict(decision.arguments)
        if action == "denoise":
            setting = str(args.get("setting", "auto"))
            if setting == "none":
                image, state = raw, state.denoised(setting)
                continue
            t = time.perf_counter()
            try:
                image, state = _denoise(raw, denoiser, setting), state.denoised(setting)
            except AutomatError:
                state = state.denoised(setting, ok=False)  # keeps the current image, as the WorkChain does
            finally:
                result.timings["denoise_s"] = result.timings.get("denoise_s", 0.0) + time.perf_counter() - t
        elif action == "measure_lattice":
            state = state.measuring_lattice()
            lat = _measure(image, result)
            if lat is None:
                state = state.replace(lattice_failed=True, lattice_attempts=state.lattice_attempts + 1)
            else:
                result.stage = result.error = None
                state = state.replace(lattice=result.lattice, lattice_failed=False,
                                      lattice_attempts=state.lattice_attempts + 1)
        elif action == "retrieve":
            t = time.perf_counter()
            try:
                ret = retrieve(image, library, lattice=lat, k=int(args.get("k", k)), propose_outside=False)
            except AutomatError as exc:
                result.stage, result.error = "retrieval", f"{type(exc).__name__}: {exc}"
                state = state.replace(done=True, outcome="retrieval failed")
                continue
            finally:
                result.timings["retrieval_s"] = result.timings.get("retrieval_s", 0.0) + time.perf_counter() - t
            cands = [c for c in ret.candidates if not c.outside_library]
            old = {c.template_id: c for c in state.candidates}
            merged = tuple(old.get(c.template_id, Candidate(c.template_id, c.formula, float(c.probability)))
                           for c in cands)
            # keep the reconstructions of candidates that come back (at a new index) from the wider search
            index = {c.template_id: i for i, c in enumerate(state.candidates)}
            recs = {i: recs[index[c.template_id]] for i, c in enumerate(merged)
                    if c.template_id in index and index[c.template_id] in recs}
            templates = [c.index for c in cands]
            result.candidate_ids = [c.template_id for c in cands]
            result.retrieval_p.update({c.template_id: float(c.probability) for c in cands})
            state = state.replace(candidates=merged, retrieve_attempts=state.retrieve_attempts + 1)
        elif action == "reconstruct":
            i = args["candidate"]
            tid = state.candidates[i].template_id
            rec = reconstruct_candidate(image, lat, library.atoms(templates[i]), result, tid, reconstruct_kw)
            if rec is None:
                state = state.with_candidate(i, status="failed", message=result.scores[tid]["error"][:200])
            else:
                recs[i] = rec
                state = state.with_candidate(i, status="reconstructed")
        elif action == "verify":
            i = args["candidate"]
            tid = state.candidates[i].template_id
            s = score_candidate(image, lat, recs[i], result, tid)
            if s is None:
                state = state.with_candidate(i, status="failed", message=result.scores[tid]["error"][:200])
            else:
                state = state.with_candidate(i, status="verified", verification_score=s)
        elif action == "relax":
            best = state.best_candidate()
            result.atoms = recs[best].atoms
            _relax(result, calculator)
            relaxed_id = state.candidates[best].template_id if result.relaxed else None
            state = state.replace(relaxed=result.relaxed, relax_failed=not result.relaxed)
        elif action == "finish":
            best = state.best_candidate() if args.get("candidate") is None else args["candidate"]
            c = state.candidates[best]
            result.template_id, result.score = c.template_id, c.verification_score
            if c.template_id != relaxed_id:  # the relaxed structure is the answer only if it is this candidate's
                result.atoms, result.relaxed = recs[best].atoms, False
            result.alternatives = {state.candidates[i].template_id: recs[i].atoms for i in state.alternatives(best)}
            state = state.replace(done=True, outcome="success")
        elif action == "give_up":
            result.atoms = None
            if result.stage is None:
                result.stage = "reconstruction" if state.candidates else ("lattice" if lat is None else "retrieval")
            result.error = result.error or str(args.get("reason") or decision.reason)
            state = state.replace(done=True, outcome=str(args.get("reason") or "gave up"))
        else:  # dft_check (and denoise without a denoiser): validate() rejects them here
            raise AutomatError(f"action {action!r} is not available in the in-process benchmark")
    return result
