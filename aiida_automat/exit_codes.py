"""One table from core exceptions to AiiDA exit codes.

AiiDA convention: 300–399 are critical failures of input/output handling (the calculation could not even
produce a readable result), 400+ are failures of our own science that a workflow may handle. Every CalcJob,
parser and WorkChain of the package takes its numbers from here, so one error means one code everywhere.
"""

from __future__ import annotations

from . import errors

#: exit status, label, message — shared by all CalcJobs (see ``calculations/base.py``).
COMMON_EXIT_CODES = (
    (300, "ERROR_NO_RETRIEVED_FOLDER", "The retrieved folder is missing."),
    (301, "ERROR_STATUS_MISSING", "The executable did not write its status file: it crashed or was killed."),
    (302, "ERROR_OUTPUT_MISSING", "An expected output file was not written."),
    (303, "ERROR_OUTPUT_CORRUPT", "An output file could not be read."),
    (310, "ERROR_INVALID_INPUT", "The inputs were rejected by the executable: {message}"),
    (320, "ERROR_IMAGE", "The image is unusable: {message}"),
    (321, "ERROR_CALIBRATION", "The pixel size is missing or inconsistent: {message}"),
    (322, "ERROR_UNKNOWN_ELEMENT", "Unknown or unsupported element: {message}"),
    (330, "ERROR_UNEXPECTED", "The executable failed unexpectedly: {message}"),
    (400, "ERROR_LATTICE_NOT_FOUND", "No periodic lattice was found in the image: {message}"),
    (401, "ERROR_NO_CANDIDATE", "No template matches the image: {message}"),
    (402, "ERROR_LIBRARY", "Template library problem: {message}"),
    (403, "ERROR_SIMULATION", "The STEM simulation failed: {message}"),
    (410, "ERROR_POTENTIAL", "The interatomic potential failed: {message}"),
    (411, "ERROR_NOT_CONVERGED", "The procedure did not converge: {message}"),
    (420, "ERROR_AGENT", "The agent policy failed: {message}"),
    (440, "ERROR_DENOISER_CHECKPOINT", "The denoiser checkpoint is missing, corrupt or cannot be loaded: {message}"),
    (441, "ERROR_CHECKSUM_MISMATCH", "A model file's sha256 differs from the one recorded on its node: {message}"),
)

#: core exception class name → exit code label. Subclasses map via their nearest listed base.
ERROR_LABELS = {
    "ImageError": "ERROR_IMAGE",
    "CalibrationError": "ERROR_CALIBRATION",
    "UnknownElement": "ERROR_UNKNOWN_ELEMENT",
    "LatticeNotFound": "ERROR_LATTICE_NOT_FOUND",
    "NoCandidate": "ERROR_NO_CANDIDATE",
    "LibraryError": "ERROR_LIBRARY",
    "SimulationError": "ERROR_SIMULATION",
    "PotentialError": "ERROR_POTENTIAL",
    "ConvergenceError": "ERROR_NOT_CONVERGED",
    "AgentError": "ERROR_AGENT",
    "ChecksumMismatch": "ERROR_CHECKSUM_MISMATCH",
    "DenoiserError": "ERROR_DENOISER_CHECKPOINT",
    "AutomatError": "ERROR_INVALID_INPUT",
}


def label_for_exception(exc: BaseException | str) -> str:
    """Exit-code label for a core exception (or its class name, as written by the executable)."""
    if isinstance(exc, str):
        return ERROR_LABELS.get(exc, "ERROR_UNEXPECTED")
    for klass in type(exc).__mro__:
        if klass.__name__ in ERROR_LABELS and issubclass(klass, errors.AutomatError):
            return ERROR_LABELS[klass.__name__]
    return "ERROR_UNEXPECTED"


def status_for_label(label: str) -> int:
    for status, name, _ in COMMON_EXIT_CODES:
        if name == label:
            return status
    raise KeyError(label)


def exit_code(label: str, message: str):
    """The ``ExitCode`` of ``label`` with its message filled in: what a calcfunction returns on failure."""
    from aiida.engine import ExitCode

    template = {name: text for _, name, text in COMMON_EXIT_CODES}[label]
    return ExitCode(status_for_label(label), template.format(message=message))
