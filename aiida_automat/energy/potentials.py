"""Interatomic potentials behind one interface: an ASE calculator factory.

``load_potential(name, checkpoint=..., device=...)`` returns ``(calculator, PotentialInfo)``. The info
names exactly which weights were used (family, version, file, sha256) so that the provenance layer can
record it and the command line can print it.

Supported families

* ``mattersim`` — MatterSim v1 (M3GNet architecture). Checkpoints are files (``mattersim-v1.0.0-1M.pth``,
  ``...-5M.pth``) found in MatterSim's cache (``~/.local/mattersim/pretrained_models``), at a given path,
  or downloaded by MatterSim itself when ``allow_download=True`` and the machine is online.
* ``chgnet`` — CHGNet; its weights ship inside the wheel (``0.3.0`` default, ``0.2.0``, ``r2scan``), or a
  path to a CHGNet checkpoint file.
* ``sevennet`` — SevenNet (``sevenn`` package, optional); a pretrained name such as ``7net-0`` or a path.

``auto`` picks MatterSim when a MatterSim checkpoint is available locally and CHGNet otherwise.

Heavy dependencies are imported inside the functions; a missing package raises ``PotentialError`` with
the command that installs it. Never pickle a MatterSim calculator (its unpickling reloads default weights).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from dataclasses import dataclass

import numpy as np

from ..hashing import file_sha256 as sha256_file
from ..errors import PotentialError, UnknownElement

FAMILIES = ("mattersim", "chgnet", "sevennet")

MATTERSIM_CACHE = pathlib.Path("~/.local/mattersim/pretrained_models").expanduser()
#: canonical MatterSim checkpoint names (lower-case alias → file name in MatterSim's cache)
MATTERSIM_CHECKPOINTS = {
    "mattersim-v1.0.0-1m": "mattersim-v1.0.0-1M.pth",
    "mattersim-v1.0.0-5m": "mattersim-v1.0.0-5M.pth",
    "1m": "mattersim-v1.0.0-1M.pth",
    "5m": "mattersim-v1.0.0-5M.pth",
}
CHGNET_VERSIONS = ("0.3.0", "0.2.0", "r2scan")
#: highest atomic number each family was trained for (CHGNet and MatterSim embed Z ≤ 94)
MAX_Z = {"mattersim": 94, "chgnet": 94, "sevennet": 89}


@dataclass(frozen=True)
class PotentialInfo:
    """Which weights a calculator uses. ``checkpoint_path`` is None only when a library hides its file."""

    name: str  # family: mattersim | chgnet | sevennet
    version: str  # model version, e.g. "mattersim-v1.0.0-1M", "0.3.0", "7net-0"
    checkpoint_path: str | None
    sha256: str | None
    device: str = "cpu"
    max_z: int = 94

    @property
    def label(self) -> str:
        short = (self.sha256 or "no-sha")[:12]
        return f"{self.name} {self.version} (sha256 {short}) on {self.device}"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "checkpoint_path": self.checkpoint_path,
            "sha256": self.sha256,
            "device": self.device,
            "max_z": self.max_z,
        }


@dataclass(frozen=True)
class EnergyResult:
    """Single-point result. Energies in eV, forces in eV/Å, stress (Voigt, ASE sign) in eV/Å³."""

    energy: float
    energy_per_atom: float
    forces: np.ndarray
    stress: np.ndarray | None
    natoms: int




def set_num_threads(num_threads: int | None) -> None:
    """Limit torch's CPU threads (clusters and shared machines). None leaves torch's default."""
    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))


# ---------------------------------------------------------------------------------------------------------
# locating checkpoints


def chgnet_checkpoint(version: str = "0.3.0") -> pathlib.Path:
    """Path of a CHGNet checkpoint shipped inside the chgnet wheel."""
    if version not in CHGNET_VERSIONS:
        raise PotentialError(f"unknown CHGNet version {version!r}; choose one of {', '.join(CHGNET_VERSIONS)}")
    try:
        import chgnet
    except ImportError as exc:
        raise PotentialError("CHGNet is not installed: pip install chgnet") from exc
    folder = pathlib.Path(chgnet.__file__).parent / "pretrained" / version
    files = sorted(folder.glob("*.pth.tar"))
    if not files:
        raise PotentialError(f"no CHGNet {version} weights in {folder}; reinstall chgnet")
    return files[0]


def mattersim_checkpoint(name_or_path: str | os.PathLike | None = None, *, allow_download: bool = False) -> pathlib.Path:
    """Resolve a MatterSim checkpoint: a file path, or a name (``mattersim-v1.0.0-1M``, ``5M``) in the cache.

    With ``allow_download`` MatterSim's own downloader fetches a missing named checkpoint (needs internet).
    """
    name_or_path = name_or_path or "mattersim-v1.0.0-1M"
    path = pathlib.Path(str(name_or_path)).expanduser()
    if path.is_file():
        return path.resolve()
    key = str(name_or_path).lower().removesuffix(".pth")
    filename = MATTERSIM_CHECKPOINTS.get(key)
    if filename is None:
        raise PotentialError(
            f"MatterSim checkpoint {name_or_path!r} is neither a file nor one of {sorted(set(MATTERSIM_CHECKPOINTS.values()))}"
        )
    cached = MATTERSIM_CACHE / filename
    if cached.is_file():
        return cached
    if allow_download:
        try:
            from mattersim.utils.download_utils import download_checkpoint
        except ImportError as exc:
            raise PotentialError("MatterSim is not installed: pip install mattersim") from exc
        try:
            download_checkpoint(filename, save_folder=str(MATTERSIM_CACHE))
        except Exception as exc:  # noqa: BLE001 - network errors of every kind
            raise PotentialError(f"could not download MatterSim checkpoint {filename}: {exc}") from exc
        if cached.is_file():
            return cached
    raise PotentialError(
        f"MatterSim checkpoint {filename} is not in {MATTERSIM_CACHE}; download it on a machine with internet "
        "(python -c 'from mattersim.forcefield import MatterSimCalculator; MatterSimCalculator()') or pass a path"
    )


def mattersim_available() -> bool:
    """True when a MatterSim checkpoint is cached locally and the package imports."""
    try:
        import mattersim  # noqa: F401
    except ImportError:
        return False
    return any((MATTERSIM_CACHE / f).is_file() for f in set(MATTERSIM_CHECKPOINTS.values()))


def default_potential() -> str:
    """MatterSim when its checkpoint is available locally, otherwise CHGNet."""
    return "mattersim" if mattersim_available() else "chgnet"


def resolve_checkpoint(name: str = "auto", checkpoint: str | os.PathLike | None = None, *, allow_download: bool = False):
    """(family, version, path or None) for a request; the path is None for SevenNet pretrained names."""
    name = (name or "auto").lower()
    if name == "auto":
        name = default_potential()
    if name == "mattersim":
        path = mattersim_checkpoint(checkpoint, allow_download=allow_download)
        return name, _mattersim_version(path), path
    if name == "chgnet":
        if checkpoint is not None and pathlib.Path(str(checkpoint)).expanduser().is_file():
            path = pathlib.Path(str(checkpoint)).expanduser().resolve()
        else:
            path = chgnet_checkpoint(str(checkpoint or "0.3.0"))
        return name, _chgnet_version(path), path
    if name == "sevennet":
        if checkpoint is not None and pathlib.Path(str(checkpoint)).expanduser().is_file():
            path = pathlib.Path(str(checkpoint)).expanduser().resolve()
            return name, path.stem, path
        return name, str(checkpoint or "7net-0"), None
    raise PotentialError(f"unknown potential {name!r}; choose one of auto, {', '.join(FAMILIES)}")


def _mattersim_version(path: pathlib.Path) -> str:
    match = re.match(r"(mattersim-v[\d.]+-\d+M)", path.name, flags=re.IGNORECASE)
    return match.group(1) if match else path.stem


def _chgnet_version(path: pathlib.Path) -> str:
    match = re.match(r"chgnet_(\d+\.\d+\.\d+|r2scan)", path.name)
    return match.group(1) if match else path.stem


# ---------------------------------------------------------------------------------------------------------
# the factory


def _check_device(device: str) -> str:
    device = (device or "cpu").lower()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PotentialError(f"device {device!r} requested but CUDA is not available on this machine")
    elif device not in ("cpu", "mps"):
        raise PotentialError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return device


def load_potential(
    name: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    allow_download: bool = False,
    num_threads: int | None = None,
    version: str | None = None,
    expected_sha256: str | None = None,
):
    """Build an ASE calculator. Returns ``(calculator, PotentialInfo)``.

    ``name``: ``auto`` | ``mattersim`` | ``chgnet`` | ``sevennet``. ``checkpoint``: a file path, or a
    family-specific name (MatterSim ``mattersim-v1.0.0-5M``; CHGNet ``0.3.0``; SevenNet ``7net-0``).
    ``version`` overrides the version read from the file name (a renamed copy of a checkpoint);
    ``expected_sha256`` makes a different file an error (a CalcJob checks its copied model this way).
    """
    set_num_threads(num_threads)
    device = _check_device(device)
    family, inferred, path = resolve_checkpoint(name, checkpoint, allow_download=allow_download)
    version = version or inferred
    sha = sha256_file(path) if path is not None else None
    if expected_sha256 and sha != expected_sha256:
        raise PotentialError(f"checkpoint {path} has sha256 {sha}, expected {expected_sha256}: wrong or corrupt file")
    if family == "mattersim":
        calculator, max_z = _load_mattersim(path, device)
    elif family == "chgnet":
        calculator, max_z = _load_chgnet(path, version, device)
    else:
        calculator, max_z = _load_sevennet(path if path is not None else version, device)
    info = PotentialInfo(family, version, str(path) if path is not None else None, sha, device, max_z)
    return calculator, info


def _load_mattersim(path: pathlib.Path, device: str):
    try:
        from mattersim.forcefield.potential import MatterSimCalculator, Potential
    except ImportError as exc:
        raise PotentialError("MatterSim is not installed: pip install 'aiida-automat[mattersim]'") from exc
    try:
        potential = Potential.from_checkpoint(str(path), device=device, load_training_state=False)
    except Exception as exc:  # noqa: BLE001 - torch/assert errors on a bad file
        raise PotentialError(f"{path.name} is not a loadable MatterSim checkpoint: {type(exc).__name__}: {exc}") from exc
    max_z = int(getattr(potential.model, "max_z", 94))
    return MatterSimCalculator(potential=potential, device=device), max_z


def _load_chgnet(path: pathlib.Path, version: str, device: str):
    try:
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as exc:
        raise PotentialError("CHGNet is not installed: pip install chgnet") from exc
    try:
        # CHGNet 0.2.0 was trained with a bias in its output MLP (see CHGNet.load)
        model = CHGNet.from_file(str(path), mlp_out_bias=version == "0.2.0", version=version)
    except Exception as exc:  # noqa: BLE001
        raise PotentialError(f"{path.name} is not a loadable CHGNet checkpoint: {type(exc).__name__}: {exc}") from exc
    model = model.to(device)
    return CHGNetCalculator(model=model, use_device=device, on_isolated_atoms="ignore"), 94


def _load_sevennet(model: str | pathlib.Path, device: str):
    try:
        from sevenn.calculator import SevenNetCalculator
    except ImportError as exc:
        raise PotentialError("SevenNet is not installed: pip install sevenn") from exc
    try:
        calculator = SevenNetCalculator(model=str(model), device=device)
    except Exception as exc:  # noqa: BLE001
        raise PotentialError(f"SevenNet model {model} could not be loaded: {type(exc).__name__}: {exc}") from exc
    return calculator, MAX_Z["sevennet"]


# ---------------------------------------------------------------------------------------------------------
# checks and single points


def check_elements(atoms, info: PotentialInfo) -> None:
    """Raise ``UnknownElement`` when the structure holds an element the model was not trained for."""
    numbers = set(int(z) for z in atoms.get_atomic_numbers())
    bad = sorted(z for z in numbers if z < 1 or z > info.max_z)
    if bad:
        from ase.data import chemical_symbols

        names = ", ".join(chemical_symbols[z] if z < len(chemical_symbols) else str(z) for z in bad)
        raise UnknownElement(f"{names} not supported by {info.name} {info.version} (Z ≤ {info.max_z})")


def _finite(value, what: str) -> None:
    if value is None:
        return
    if not np.all(np.isfinite(np.asarray(value, dtype=float))):
        raise PotentialError(f"the potential returned a non-finite {what}")


def single_point(atoms, calculator, *, stress: bool = True) -> EnergyResult:
    """Energy, forces (and stress) of ``atoms`` at fixed geometry; non-finite values raise PotentialError."""
    work = atoms.copy()
    work.calc = calculator
    try:
        energy = float(work.get_potential_energy())
        forces = np.array(work.get_forces(), dtype=float)
        sigma = np.array(work.get_stress(voigt=True), dtype=float) if stress else None
    except (RuntimeError, ValueError, IndexError) as exc:
        raise PotentialError(f"the potential failed on {work.get_chemical_formula()}: {type(exc).__name__}: {exc}") from exc
    if not math.isfinite(energy):
        raise PotentialError(f"the potential returned a non-finite energy for {work.get_chemical_formula()}")
    _finite(forces, "force")
    _finite(sigma, "stress")
    return EnergyResult(energy, energy / len(work), forces, sigma, len(work))
