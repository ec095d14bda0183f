"""Exceptions raised by the science core.

The core raises these with a one-line message a user can act on; the AiiDA layer maps each class to an
exit code (see ``aiida_automat.exit_codes``) and the command line prints the message and exits 1. Keeping
one small hierarchy means no caller has to parse messages to decide what went wrong.
"""


class AutomatError(Exception):
    """Base class: something about the input or the science prevents a result."""


class ImageError(AutomatError):
    """The image cannot be read or is unusable (empty, blank, NaN pixels, too small)."""


class CalibrationError(AutomatError):
    """The pixel size is missing or inconsistent with what the image shows."""


class LatticeNotFound(AutomatError):
    """No periodic 2D lattice could be measured in the image."""


class NoCandidate(AutomatError):
    """No template structure matches the image well enough."""


class UnknownElement(AutomatError):
    """An element symbol is not a chemical element or is not supported by the chosen model."""


class LibraryError(AutomatError):
    """A template library is missing, corrupt or was built for other settings."""


class SimulationError(AutomatError):
    """A STEM simulation could not be set up or produced an invalid image."""


class PotentialError(AutomatError):
    """An interatomic potential is unavailable, or returned non-finite energies/forces."""


class ConvergenceError(AutomatError):
    """An iterative procedure (relaxation, fit) did not converge within its limits."""


class AgentError(AutomatError):
    """An agent policy returned an invalid or impossible decision."""


class ChecksumMismatch(AutomatError):
    """A file's content does not match the sha256 recorded for it: a corrupt copy or a replaced file."""
