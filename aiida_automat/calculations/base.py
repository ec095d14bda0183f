"""Base CalcJob for every heavy stage: run ``automat-exec STAGE`` on any computer.

Like aiida-quantumespresso's ``BasePwCpInputGenerator``, the shared part lives here: the stage writes
``parameters.json`` plus stage files, the executable writes its outputs and a ``status.json`` that says
whether it succeeded and, if not, which core exception stopped it. The parser (``parsers/base.py``) turns
that into the exit code from ``aiida_automat.exit_codes``, so a failure on a cluster node reads the same
as one in-process.
"""

from __future__ import annotations

import json

from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from ..exit_codes import COMMON_EXIT_CODES

PARAMETERS_FILE = "parameters.json"
STATUS_FILE = "status.json"
STDOUT_FILE = "aiida.out"


class AutomatCalcJob(CalcJob):
    """Shared inputs, exit codes and submission of the package's stage CalcJobs.

    Subclasses set ``_stage`` (the ``automat-exec`` sub-command), ``_output_files`` (what to retrieve) and
    implement ``write_stage_inputs(folder)`` to place their input files; they return a JSON-able dict of
    parameters from ``stage_parameters()``. Each sets its own ``CACHE_VERSION`` and bumps it whenever the
    stage's results change for the same inputs, so AiiDA's cache stops reusing results of the old code.
    """

    _stage: str = ""
    _output_files: tuple[str, ...] = ()
    _default_parser: str = ""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.inputs["metadata"]["options"]["resources"].default = {"num_machines": 1, "num_mpiprocs_per_machine": 1}
        spec.inputs["metadata"]["options"]["withmpi"].default = False
        if cls._default_parser:
            spec.inputs["metadata"]["options"]["parser_name"].default = cls._default_parser
        spec.input(
            "metadata.options.output_filename",
            valid_type=str,
            default=STDOUT_FILE,
            help="File the executable's standard output is written to.",
        )
        for status, label, message in COMMON_EXIT_CODES:
            # a crash or a corrupt file copy says nothing about the inputs: never reuse such a result
            spec.exit_code(status, label, message=message,
                           invalidates_cache=status < 400 or label in ("ERROR_UNEXPECTED", "ERROR_CHECKSUM_MISMATCH"))

    def stage_parameters(self) -> dict:
        raise NotImplementedError

    def write_stage_inputs(self, folder) -> list:
        """Write stage-specific input files into ``folder``; return extra ``local_copy_list`` entries."""
        return []

    def prepare_for_submission(self, folder):
        with folder.open(PARAMETERS_FILE, "w", encoding="utf8") as handle:
            json.dump(self.stage_parameters(), handle, indent=2, sort_keys=True)
        local_copy_list = self.write_stage_inputs(folder)

        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = [self._stage, "--parameters", PARAMETERS_FILE, "--status", STATUS_FILE]
        codeinfo.stdout_name = self.metadata.options.output_filename

        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = local_copy_list
        calcinfo.retrieve_list = [STATUS_FILE, self.metadata.options.output_filename, *self._output_files]
        return calcinfo


def validator_from_check(check):
    """A spec validator that runs the executable's own parameter check and returns its message instead of
    raising, so a bad Dict is refused at submission with the same words the executable would use."""
    from ..errors import AutomatError

    def validate(value, _ctx=None):
        if value is None:
            return None
        try:
            check(value.get_dict())
        except AutomatError as exc:
            return str(exc)
        return None

    return validate


def dict_input(node: orm.Dict | None) -> dict:
    return {} if node is None else node.get_dict()
