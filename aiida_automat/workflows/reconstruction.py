"""``automat.reconstruction``: image in, structure (and energies) out, one agent decision per step.

The outline is a loop — decide, act, inspect — in which a policy (the rules table by default, or an LLM)
picks the next action from a state summary. Every decision is the output of the ``decide`` calcfunction,
so the provenance graph shows why every step ran; every action is a calcfunction, CalcJob or sub-workflow
of its own, so the WorkChain itself creates no data. Candidates are reconstructed and verified in
retrieval order; the best verified one wins.
"""

from __future__ import annotations

import pathlib

import numpy as np
import yaml
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, if_, while_

from ..agent.state import MAX_STEPS, WIDEN_BELOW, AgentState, Candidate
from ..calculations.functions import collect_trace, decide, measure_lattice, reconstruct_candidate, verify_candidate
from ..errors import AutomatError, LatticeNotFound
from ..exit_codes import label_for_exception

PROTOCOLS = pathlib.Path(__file__).resolve().parents[1] / "protocols" / "reconstruction.yaml"


def _noise_level(data: np.ndarray) -> float:
    """Pixel noise σ relative to the signal's spread (Immerkær's estimator, robust on low-count images)."""
    from ..denoise.core import noise_sigma

    spread = float(np.percentile(data, 99) - np.percentile(data, 1))
    return min(1.0, noise_sigma(data) / spread) if spread > 0 else 1.0


class ReconstructionWorkChain(WorkChain):
    """Reconstruct a 2D crystal structure from a STEM image, steered by an agent policy."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        from ..data.stem_image import StemImageData

        spec.input("image", valid_type=StemImageData, help="The calibrated STEM image.")
        spec.input_namespace("templates", valid_type=orm.StructureData, dynamic=True, required=False,
                             help="Candidate structures to try, in this order (used when no library is given).")
        spec.input("library", valid_type=orm.Data, required=False,
                   help="Template library index node to retrieve candidates from.")
        spec.input("parameters", valid_type=orm.Dict, default=lambda: orm.Dict({}),
                   help="k, accept_score, widen_below, max_steps, elements, calibration_tol, strain_tol, symprec_A, relax, dft.")
        spec.input("policy", valid_type=orm.Dict, default=lambda: orm.Dict({"name": "rules"}),
                   help="Agent policy: {'name': 'rules'} or {'name': 'llm', 'model': ..., 'base_url': ...}; "
                        "the API key is read from OPENAI_API_KEY, never stored.")
        spec.input("code", valid_type=orm.AbstractCode, required=False,
                   help="automat-exec code for the relaxation CalcJob (needed when relax is requested).")
        spec.input("model", valid_type=orm.Data, required=False,
                   help="ML potential checkpoint (automat.model); default: MatterSim if available, else CHGNet.")
        spec.input("denoiser", valid_type=orm.Data, required=False,
                   help="Denoiser checkpoint (automat.model, family 'denoiser'); enables the denoise action, which the "
                        "rules use when no lattice is found in the raw image.")
        spec.input("relax_parameters", valid_type=orm.Dict, required=False,
                   help="Parameters of the relaxation: protocol, overrides (fmax, steps, ...) and 'options', the "
                        "CalcJob's metadata.options (resources, queue_name, device='cuda', ...).")
        spec.input("pw_code", valid_type=orm.AbstractCode, required=False, help="pw.x code for the DFT check.")
        spec.input("pseudo_family", valid_type=orm.Str, required=False, help="aiida-pseudo family label for the DFT check.")
        spec.input("dft_parameters", valid_type=orm.Dict, required=False,
                   help="DFT check settings: {'protocol': 'fast'|'balanced'|..., 'overrides': {...}, 'options': {...}} "
                        "(aiida-quantumespresso style; options are the pw.x CalcJob options, e.g. withmpi).")

        spec.outline(
            cls.setup,
            while_(cls.not_done)(cls.decide, cls.act, if_(cls.waiting)(cls.inspect)),
            cls.results,
        )
        spec.output("structure", valid_type=orm.StructureData, required=False, help="The reconstructed structure.")
        spec.output("cif", valid_type=orm.SinglefileData, required=False, help="The structure as CIF.")
        spec.output("diagnostics", valid_type=orm.Dict, required=False, help="Fit, strain, distortion, symmetry, flags.")
        spec.output("verification", valid_type=orm.Dict, required=False, help="Closed-loop verification of the result.")
        spec.output("overlay", valid_type=orm.SinglefileData, required=False, help="PNG: image, columns, cell.")
        spec.output("template", valid_type=orm.StructureData, required=False, help="The winning template.")
        spec.output("lattice", valid_type=orm.Dict, required=False, help="The measured lattice.")
        spec.output("relaxed_structure", valid_type=orm.StructureData, required=False, help="ML-relaxed structure.")
        spec.output("energies", valid_type=orm.Dict, required=False, help="Energies of the relaxed structure.")
        spec.output("dft", valid_type=orm.Dict, required=False, help="DFT check results.")
        spec.output("denoised_image", valid_type=orm.Data, required=False,
                    help="The denoised image the result was reconstructed from (only when the raw one had no lattice).")
        spec.output("trace", valid_type=orm.List, required=False, help="The agent's decisions, in order.")
        spec.output("retrieval", valid_type=orm.Dict, required=False, help="The last ranked candidate list of the library.")
        spec.output_namespace(
            "alternatives", valid_type=orm.StructureData, dynamic=True, required=False,
            help="Reconstructions of other formulas that verified within ALTERNATIVE_MARGIN of the answer "
                 "(``candidate_<index>``): what the image does not rule out, e.g. Si vs SiH.")

        spec.exit_code(320, "ERROR_IMAGE", message="The image is unusable: {message}")
        spec.exit_code(400, "ERROR_LATTICE_NOT_FOUND", message="No periodic lattice was found in the image.")
        spec.exit_code(401, "ERROR_NO_CANDIDATE", message="No candidate structure explains the image: {message}")
        spec.exit_code(402, "ERROR_LIBRARY", message="Template library problem: {message}")
        spec.exit_code(403, "ERROR_NO_TEMPLATES", message="Neither a library nor templates were given.")
        spec.exit_code(430, "ERROR_RELAX_FAILED", message="The relaxation failed: {message}")
        spec.exit_code(431, "ERROR_DFT_FAILED", message="The DFT check failed: {message}")

    @classmethod
    def get_builder_from_protocol(cls, image, *, protocol: str | None = None, overrides: dict | None = None,
                                  templates=None, library=None, code=None, policy: str = "rules", denoiser=None,
                                  **policy_settings):
        """A builder with the protocol's parameters merged with ``overrides`` (like aiida-quantumespresso)."""
        data = yaml.safe_load(PROTOCOLS.read_text())
        protocol = protocol or data["default_protocol"]
        if protocol not in data["protocols"]:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(data['protocols'])}")
        preset = data["protocols"][protocol]
        params = dict(preset["parameters"])
        params.update((overrides or {}).get("parameters", {}))
        builder = cls.get_builder()
        builder.image = image
        builder.parameters = orm.Dict(params)
        builder.policy = orm.Dict({"name": policy, **policy_settings})
        if templates:
            builder.templates = {f"t{i}": t for i, t in enumerate(templates)}
        if library is not None:
            builder.library = library
        if code is not None:
            builder.code = code
        if denoiser is None and preset.get("denoise", False):
            from ..calculations.denoise import default_denoiser

            denoiser = default_denoiser()
        if denoiser is not None:
            builder.denoiser = denoiser
        relax = {"protocol": preset.get("relax_protocol", "moderate")}
        relax.update((overrides or {}).get("relax_parameters", {}))
        builder.relax_parameters = orm.Dict(relax)
        return builder

    def load_instance_state(self, saved_state, load_context):
        """Resume from a checkpoint, closing the step a stopped daemon worker left half-run."""
        super().load_instance_state(saved_state, load_context)
        self._close_interrupted_steps()

    def _close_interrupted_steps(self):
        """Mark process-function children that can never finish as killed.

        Calcfunctions run inside the worker; when the worker stops mid-call, its node stays 'created' or
        'running' forever while the resumed WorkChain runs the step again. Closing the orphan keeps one
        finished node per step, so nothing in the graph looks duplicated or still pending.
        """
        from aiida.engine import ProcessState

        for child in self.node.called:
            if isinstance(child, orm.CalcFunctionNode) and not child.is_terminated and not child.is_sealed:
                child.set_process_state(ProcessState.KILLED)
                child.set_process_status("interrupted: the daemon worker stopped during this call; the step was re-run")
                child.seal()
                self.report(f"closed {child.process_label}<{child.pk}>, interrupted by a worker shutdown; re-running the step")

    # ------------------------------------------------------------------ outline
    def setup(self):
        p = self.inputs.parameters.get_dict()
        try:
            img = self.inputs.image.to_stem_image().validate()
        except AutomatError as exc:
            return self.exit_codes.ERROR_IMAGE.format(message=str(exc))
        if "library" not in self.inputs and not self.inputs.get("templates"):
            return self.exit_codes.ERROR_NO_TEMPLATES
        relax = bool(p.get("relax", True))
        if relax and "code" not in self.inputs:
            self.report("relaxation requested but no automat-exec code given: the structure will not be relaxed")
            relax = False
        dft = bool(p.get("dft", False))
        widen = p.get("widen_below", WIDEN_BELOW)  # None: never widen
        state = AgentState(
            max_steps=int(p.get("max_steps", MAX_STEPS)),
            default_k=int(p.get("k", 5)),
            accept_score=float(p.get("accept_score", 0.9)),
            widen_below=None if widen is None else float(widen),
            noise_level=_noise_level(img.data),
            can_denoise="denoiser" in self.inputs,
            relax_requested=relax,
            dft_requested=dft,
            dft_available=dft and "pw_code" in self.inputs,
        )
        if dft and "pw_code" not in self.inputs:
            self.report("DFT check requested but no pw.x code given: skipped")
        self.ctx.state = state.as_dict()
        self.ctx.image = self.inputs.image  # the image the actions use: the raw one, or a denoised one
        self.ctx.decisions = {}
        self.ctx.templates = []  # StructureData per candidate index
        self.ctx.recon = {}
        self.ctx.lattice = None
        self.ctx.waiting = None
        self.ctx.exit = None

    def not_done(self):
        return not self.ctx.state["done"]

    def waiting(self):
        return self.ctx.waiting is not None

    def _agent(self) -> AgentState:
        return AgentState.from_dict(self.ctx.state)

    def _record(self, state: AgentState, note: str):
        state = state.replace(history=state.history + (note,))
        self.ctx.state = state.as_dict()

    def decide(self):
        state = self._agent()
        summary = state.as_dict()
        summary.pop("history", None)
        result, node = decide.run_get_node(state=orm.Dict(summary), policy=self.inputs.policy)
        node.base.caching.is_valid_cache = False  # a decision is a moment's judgement, never reused
        step = state.step
        self.ctx.decisions[f"step_{step}"] = result
        decision = result.get_dict()
        if decision["policy"] != "rules" and decision["policy"] != "llm":
            self.report(f"step {step}: LLM reply rejected, rules decided: {decision['reason']}")
        self.report(f"step {step}: {decision['action']} {decision['arguments'] or ''} — {decision['reason']}")
        self.ctx.decision = decision
        self._record(state.replace(step=step + 1), decision["action"])

    def act(self):
        action = self.ctx.decision["action"]
        args = self.ctx.decision["arguments"]
        return getattr(self, f"_act_{action}")(**args)

    # ------------------------------------------------------------------ actions
    def _act_denoise(self, setting="auto"):
        """Denoise the raw image (never a denoised one); 'none' rolls back to the raw image."""
        from ..calculations.denoise_function import denoise_image

        state = self._agent()
        if setting == "none":
            self.ctx.image = self.inputs.image
            self._record(state.denoised(setting), "back to the raw image")
            return
        outputs, node = denoise_image.run_get_node(self.inputs.image, self.inputs.denoiser, orm.Dict({"setting": setting}))
        if not node.is_finished_ok:
            self.report(f"denoise '{setting}' failed: {node.exit_message}; keeping the {state.current_image} image")
            self._record(state.denoised(setting, ok=False), "denoise failed")
            return
        self.ctx.image = outputs["image"]
        gate = outputs["report"].get("gate_weights")
        self.report(f"denoised with '{setting}' (gate weights {gate})")
        self._record(state.denoised(setting), f"denoised {setting}")

    def _act_measure_lattice(self):
        state = self._agent().measuring_lattice()
        try:
            self.ctx.lattice = measure_lattice(self.ctx.image)
        except LatticeNotFound as exc:
            self.report(f"lattice not found in the {state.current_image} image: {exc}")
            self._record(state.replace(lattice_failed=True, lattice_attempts=state.lattice_attempts + 1), "no lattice")
            return
        lat = self.ctx.lattice
        self._record(
            state.replace(lattice={"a": lat["a_A"], "b": lat["b_A"], "gamma": lat["gamma_deg"]},
                          lattice_failed=False, lattice_attempts=state.lattice_attempts + 1),
            "lattice measured",
        )

    def _act_retrieve(self, k=5):
        state = self._agent()
        cands = []
        if "library" in self.inputs:
            from ..calculations.retrieve import retrieve as retrieve_cf

            p = self.inputs.parameters.get_dict()
            params = {"k": int(k)}
            if p.get("elements"):
                params["elements"] = list(p["elements"])
            if p.get("mode"):
                params["mode"] = p["mode"]
            outputs, node = retrieve_cf.run_get_node(self.ctx.image, self.inputs.library, orm.Dict(params))
            if not node.is_finished_ok:
                self.report(f"retrieval failed: {node.exit_message}")
                code = self.exit_codes.ERROR_LIBRARY if node.exit_status == 402 else self.exit_codes.ERROR_NO_CANDIDATE
                self.ctx.exit = code.format(message=node.exit_message or "")
                self._record(state.replace(done=True, outcome="retrieval failed"), "retrieval failed")
                return
            self.ctx.retrieval = outputs["result"]
            for warning in outputs["result"].get_dict().get("warnings", []):
                self.report(f"retrieval: {warning}")
            ranked = outputs["result"].get_dict()["candidates"]
            self.ctx.templates = [outputs[f"candidate_{c['rank']}"] for c in ranked]
            for c in ranked:
                cands.append(Candidate(str(c["template_id"]), str(c["formula"]), float(c.get("probability", 0.0))))
        else:
            templates = self.inputs.templates
            keys = sorted(templates, key=lambda s: int(s[1:]) if s[1:].isdigit() else s)
            self.ctx.templates = [templates[key] for key in keys][: max(int(k), 1) * 10]
            for key, t in zip(keys, self.ctx.templates):
                cands.append(Candidate(key, t.get_formula(mode="hill_compact"), 1.0))
        old = {c.template_id: c for c in state.candidates}
        merged = tuple(old.get(c.template_id, c) for c in cands)
        self._record(state.replace(candidates=merged, retrieve_attempts=state.retrieve_attempts + 1), f"{len(cands)} candidates")

    def _act_reconstruct(self, candidate):
        state = self._agent()
        template = self.ctx.templates[candidate]
        params = {k: v for k, v in self.inputs.parameters.get_dict().items()
                  if k in ("calibration_tol", "strain_tol", "symmetrize", "symprec_A")}
        try:
            out = reconstruct_candidate(self.ctx.image, self.ctx.lattice, template, orm.Dict(params))
        except AutomatError as exc:
            self.report(f"candidate {candidate} failed: {exc}")
            self._record(state.with_candidate(candidate, status="failed", message=str(exc)[:200]), "reconstruct failed")
            return
        self.ctx.recon[str(candidate)] = out
        self._record(state.with_candidate(candidate, status="reconstructed"), "reconstructed")

    def _act_verify(self, candidate):
        state = self._agent()
        out = self.ctx.recon[str(candidate)]
        try:
            ver = verify_candidate(self.ctx.image, self.ctx.lattice, out["structure"], out["diagnostics"])
        except AutomatError as exc:
            self._record(state.with_candidate(candidate, status="failed", message=str(exc)[:200]), "verify failed")
            return
        self.ctx.recon[str(candidate)]["verification"] = ver
        if ver.get("contrast_penalty", 0.0) >= 0.001:
            self.report(f"candidate {candidate} ({state.candidates[candidate].formula}): the image has "
                        f"{ver['contrast']:.2f}× the contrast this structure would give it (beam-fraction units); "
                        f"ranking penalty {ver['contrast_penalty']:.4f}")
        self._record(state.with_candidate(candidate, status="verified", verification_score=float(ver["ranking_score"])),
                     "verified")

    def _act_relax(self, potential="auto"):
        from ..calculations.relax import RelaxCalculation

        state = self._agent()
        best = state.best_candidate()
        structure = self.ctx.recon[str(best)]["structure"]
        relax_params = self.inputs.get("relax_parameters")
        protocol = relax_params.get("protocol", "moderate") if relax_params else "moderate"
        overrides = {k: v for k, v in (relax_params.get_dict() if relax_params else {}).items() if k != "protocol"}
        options = overrides.pop("options", {})  # scheduler options: resources, queue, device (cluster/GPU)
        try:
            builder = RelaxCalculation.get_builder_from_protocol(
                self.inputs.code, structure, model=self.inputs.get("model", potential), protocol=protocol,
                overrides=overrides or None,
            )
            for key, value in options.items():
                builder.metadata.options[key] = value
        except (AutomatError, ValueError, KeyError) as exc:
            self.report(f"relaxation could not be set up: {exc}")
            self._record(state.replace(relax_failed=True), "relax failed")
            return
        self.ctx.waiting = "relax"
        return ToContext(relax=self.submit(builder))

    def _act_dft_check(self):
        from .dft_check import DftCheckWorkChain

        state = self._agent()
        kwargs = {}
        if "pseudo_family" in self.inputs:
            kwargs["pseudo_family"] = self.inputs.pseudo_family.value
        settings = self.inputs.dft_parameters.get_dict() if "dft_parameters" in self.inputs else {}
        ml = self.ctx.relax.outputs.output_parameters.get_dict()
        ml_energies = {k: ml[k] for k in ("energy_per_atom", "formation_energy_per_atom") if ml.get(k) is not None}
        model = ml.get("model")
        ml_energies["model"] = model.get("name") if isinstance(model, dict) else str(model)
        builder = DftCheckWorkChain.get_builder_from_protocol(
            self.inputs.pw_code, self.ctx.relax.outputs.relaxed_structure, protocol=settings.get("protocol", "fast"),
            overrides=settings.get("overrides"), options=settings.get("options"), ml_energies=ml_energies, **kwargs,
        )
        self.ctx.waiting = "dft"
        self._record(state, "dft submitted")
        return ToContext(dft=self.submit(builder))

    def _act_finish(self, candidate=None):
        state = self._agent()
        best = state.best_candidate() if candidate is None else candidate
        self.ctx.best = best
        self._record(state.replace(done=True, outcome="success"), f"finish {best}")

    def _report_alternatives(self, state, best):
        alternatives = state.alternatives(best)
        for i in alternatives:
            self.out(f"alternatives.candidate_{i}", self.ctx.recon[str(i)]["structure"])
        if alternatives:
            chosen = state.candidates[best]
            others = ", ".join(f"{state.candidates[i].formula} ({state.candidates[i].template_id}, "
                               f"{state.candidates[i].verification_score:.4f})" for i in alternatives)
            self.report(f"answer {chosen.formula} ({chosen.template_id}, {chosen.verification_score:.4f}); the image "
                        f"fits these about as well and does not rule them out: {others}")

    def _act_give_up(self, reason=""):
        state = self._agent()
        self._record(state.replace(done=True, outcome=reason or "gave up"), "give up")

    def inspect(self):
        what, self.ctx.waiting = self.ctx.waiting, None
        state = self._agent()
        if what == "relax":
            node = self.ctx.relax
            if not node.is_finished_ok:
                self.report(f"relaxation failed: {node.exit_status} {node.exit_message}")
                self._record(state.replace(relax_failed=True), "relax failed")
                return
            energy = node.outputs.output_parameters.get("energy_per_atom")
            best = state.best_candidate()
            state = state.with_candidate(best, energy_per_atom=energy)
            self._record(state.replace(relaxed=True), "relaxed")
        elif what == "dft":
            node = self.ctx.dft
            if not node.is_finished_ok:
                self.report(f"DFT check failed: {node.exit_status} {node.exit_message}")
            self._record(state.replace(dft_done=True), "dft done")

    def results(self):
        state = self._agent()
        if self.ctx.decisions:
            self.out("trace", collect_trace(**self.ctx.decisions))
        if self.ctx.lattice is not None:
            self.out("lattice", self.ctx.lattice)
        if self.ctx.image.pk != self.inputs.image.pk:
            self.out("denoised_image", self.ctx.image)
        if self.ctx.get("retrieval") is not None:
            self.out("retrieval", self.ctx.retrieval)
        if self.ctx.exit is not None:
            return self.ctx.exit
        if state.outcome != "success":
            if state.lattice is None:
                return self.exit_codes.ERROR_LATTICE_NOT_FOUND
            return self.exit_codes.ERROR_NO_CANDIDATE.format(message=state.outcome or "")
        best = self.ctx.best
        out = self.ctx.recon[str(best)]
        for key in ("structure", "cif", "diagnostics", "overlay", "verification"):
            self.out(key, out[key])
        self.out("template", self.ctx.templates[best])
        self._report_alternatives(state, best)
        if state.relaxed:
            self.out("relaxed_structure", self.ctx.relax.outputs.relaxed_structure)
            self.out("energies", self.ctx.relax.outputs.output_parameters)
        elif state.relax_failed:
            node = self.ctx.get("relax")
            msg = f"{node.exit_status} {node.exit_message}" if node is not None else "setup failed"
            return self.exit_codes.ERROR_RELAX_FAILED.format(message=msg)
        if state.dft_done:
            if not self.ctx.dft.is_finished_ok:
                return self.exit_codes.ERROR_DFT_FAILED.format(message=f"{self.ctx.dft.exit_status} {self.ctx.dft.exit_message}")
            self.out("dft", self.ctx.dft.outputs.dft_check)
