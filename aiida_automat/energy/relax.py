"""2D-aware relaxation: atomic positions and the in-plane cell; the layer normal and vacuum stay fixed.

The cell filter (ASE ``FrechetCellFilter``, or ``UnitCellFilter``) gets the Voigt mask
``[xx, yy, zz, yz, xz, xy] = [1, 1, 0, 0, 0, 1]``: only in-plane strain is allowed, so the third cell vector
(perpendicular to the layer, carrying the vacuum) is never changed and ``a``, ``b`` stay in the plane.
Optionally ``FixSymmetry`` keeps the space group. Presets (fast / moderate / precise) live in
``aiida_automat/protocols/relax.yaml``. ``relax_bulk`` (all cell degrees of freedom) is used for the
elemental reference crystals.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ConvergenceError, PotentialError

PROTOCOL_FILE = pathlib.Path(__file__).resolve().parents[1] / "protocols" / "relax.yaml"
OPTIMIZERS = ("FIRE", "BFGS", "LBFGS")
CELL_FILTERS = ("frechet", "unitcell")
IN_PLANE_MASK = (1, 1, 0, 0, 0, 1)


@dataclass(frozen=True)
class RelaxSettings:
    optimizer: str = "FIRE"
    fmax: float = 0.05  # eV/Å
    steps: int = 400
    relax_cell: bool = True
    fix_symmetry: bool = False
    symprec: float = 1e-3
    cell_filter: str = "frechet"
    max_step: float | None = None  # optimizer step length limit in Å (ASE default when None)

    def __post_init__(self):
        if self.optimizer.upper() not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.cell_filter not in CELL_FILTERS:
            raise ValueError(f"cell_filter must be one of {CELL_FILTERS}, not {self.cell_filter!r}")
        if not (self.fmax > 0 and self.steps >= 0):
            raise ValueError("fmax must be > 0 and steps >= 0")

    def as_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.upper(),
            "fmax": self.fmax,
            "steps": self.steps,
            "relax_cell": self.relax_cell,
            "fix_symmetry": self.fix_symmetry,
            "symprec": self.symprec,
            "cell_filter": self.cell_filter,
            "max_step": self.max_step,
        }


@dataclass(frozen=True)
class RelaxResult:
    """Outcome of a relaxation. Energies eV, forces eV/Å, stress Voigt eV/Å³ (of the periodic cell)."""

    atoms: object  # ase.Atoms, relaxed
    energy: float
    energy_per_atom: float
    initial_energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    max_force: float  # largest atomic force, eV/Å
    converged: bool
    steps: int
    settings: RelaxSettings
    trajectory: tuple = field(default=(), repr=False)  # ase.Atoms frames with SinglePointCalculator results

    def summary(self) -> dict:
        cell = np.asarray(self.atoms.cell)
        return {
            "energy": self.energy,
            "energy_per_atom": self.energy_per_atom,
            "initial_energy": self.initial_energy,
            "max_force": self.max_force,
            "stress": None if self.stress is None else [float(x) for x in self.stress],
            "converged": self.converged,
            "steps": self.steps,
            "natoms": len(self.atoms),
            "formula": self.atoms.get_chemical_formula(),
            "a": float(np.linalg.norm(cell[0])),
            "b": float(np.linalg.norm(cell[1])),
            "in_plane_area": float(np.linalg.norm(np.cross(cell[0], cell[1]))),
            "settings": self.settings.as_dict(),
        }


def load_protocols(path: str | pathlib.Path = PROTOCOL_FILE) -> dict:
    import yaml

    with open(path, encoding="utf8") as handle:
        return yaml.safe_load(handle)


def protocol_settings(protocol: str | None = None, **overrides) -> RelaxSettings:
    """``RelaxSettings`` from a named preset with keyword overrides (unknown keys raise ValueError)."""
    data = load_protocols()
    protocol = protocol or data["default_protocol"]
    if protocol not in data["protocols"]:
        raise ValueError(f"unknown relax protocol {protocol!r}; choose one of {sorted(data['protocols'])}")
    values = {k: v for k, v in data["protocols"][protocol].items() if k != "description"}
    known = set(RelaxSettings.__dataclass_fields__)
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown relax settings {sorted(unknown)}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RelaxSettings(**values)


def check_layer_geometry(atoms, tol: float = 1e-6) -> None:
    """The third cell vector must be perpendicular to the first two (layer normal along c)."""
    cell = np.asarray(atoms.cell)
    c = cell[2]
    if np.linalg.norm(c) < 1e-8:
        raise ValueError("the cell has no third vector: a 2D structure needs a vacuum direction")
    unit = c / np.linalg.norm(c)
    if abs(np.dot(cell[0], unit)) > tol * 1e3 or abs(np.dot(cell[1], unit)) > tol * 1e3:
        raise ValueError("the third cell vector is not perpendicular to the layer; put the layer normal along c")


def _optimizer(settings: RelaxSettings, target):
    from ase import optimize

    klass = getattr(optimize, settings.optimizer.upper())
    kwargs = {"logfile": None}
    if settings.max_step is not None:
        kwargs["maxstep"] = settings.max_step
    return klass(target, **kwargs)


def _snapshot(atoms, energy, forces, stress):
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.constraints = []
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces, stress=stress)
    return frame


def _relax(atoms, calculator, settings: RelaxSettings, mask, *, strict: bool, keep_trajectory: bool) -> RelaxResult:
    from ase.filters import FrechetCellFilter, UnitCellFilter

    work = atoms.copy()
    work.calc = calculator
    if settings.fix_symmetry:
        from ase.constraints import FixSymmetry

        work.set_constraint(FixSymmetry(work, symprec=settings.symprec))
    target = work
    if settings.relax_cell:
        klass = FrechetCellFilter if settings.cell_filter == "frechet" else UnitCellFilter
        target = klass(work, mask=list(mask) if mask is not None else None)

    frames: list = []
    state = {"nan": False}

    def record():
        energy = work.get_potential_energy()
        forces = work.get_forces()
        if not (math.isfinite(energy) and np.all(np.isfinite(forces))):
            state["nan"] = True
            raise PotentialError(f"non-finite energy or forces during the relaxation of {work.get_chemical_formula()}")
        if keep_trajectory:
            stress = work.get_stress(voigt=True) if settings.relax_cell else None
            frames.append(_snapshot(work, energy, forces, stress))

    try:
        initial_energy = float(work.get_potential_energy())
    except (RuntimeError, ValueError, IndexError) as exc:
        raise PotentialError(f"the potential failed on {work.get_chemical_formula()}: {exc}") from exc
    if not math.isfinite(initial_energy):
        raise PotentialError(f"the potential returned a non-finite energy for {work.get_chemical_formula()}")
    opt = _optimizer(settings, target)
    opt.attach(record, interval=1)
    try:
        opt.run(fmax=settings.fmax, steps=settings.steps)
    except PotentialError:
        raise
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        raise PotentialError(f"relaxation of {work.get_chemical_formula()} failed: {type(exc).__name__}: {exc}") from exc
    steps = int(opt.nsteps)
    # converged means the optimizer criterion (atoms and, when relaxed, the cell) is met
    filter_forces = target.get_forces()
    converged = bool(np.sqrt((filter_forces**2).sum(axis=1).max()) < settings.fmax)

    energy = float(work.get_potential_energy())
    forces = np.array(work.get_forces(apply_constraint=False), dtype=float)
    stress = np.array(work.get_stress(voigt=True), dtype=float) if settings.relax_cell else None
    if not (math.isfinite(energy) and np.all(np.isfinite(forces))):
        raise PotentialError(f"non-finite energy or forces after relaxing {work.get_chemical_formula()}")
    relaxed = work.copy()
    relaxed.constraints = []
    relaxed.calc = None
    if strict and not converged:
        raise ConvergenceError(
            f"{relaxed.get_chemical_formula()} not relaxed to fmax {settings.fmax} eV/Å within {settings.steps} steps"
        )
    return RelaxResult(
        atoms=relaxed,
        energy=energy,
        energy_per_atom=energy / len(relaxed),
        initial_energy=initial_energy,
        forces=forces,
        stress=stress,
        max_force=float(np.sqrt((forces**2).sum(axis=1).max())) if len(forces) else 0.0,
        converged=converged,
        steps=steps,
        settings=settings,
        trajectory=tuple(frames),
    )


def relax_2d(atoms, calculator, settings: RelaxSettings | None = None, *, strict: bool = False, keep_trajectory: bool = True) -> RelaxResult:
    """Relax positions and the in-plane cell of a monolayer (layer normal along the third cell vector).

    The calculation is done fully periodic (the vacuum separates the images); non-convergence only sets
    ``converged=False`` unless ``strict`` (then ``ConvergenceError``).
    """
    settings = settings or RelaxSettings()
    check_layer_geometry(atoms)
    work = atoms.copy()
    work.pbc = True
    result = _relax(work, calculator, settings, IN_PLANE_MASK, strict=strict, keep_trajectory=keep_trajectory)
    result.atoms.pbc = atoms.pbc  # hand back with the caller's periodicity
    return result


def relax_bulk(atoms, calculator, settings: RelaxSettings | None = None, *, strict: bool = False, keep_trajectory: bool = False) -> RelaxResult:
    """Relax positions and all cell degrees of freedom (3D crystals, e.g. elemental references)."""
    settings = settings or RelaxSettings()
    work = atoms.copy()
    work.pbc = True
    return _relax(work, calculator, settings, None, strict=strict, keep_trajectory=keep_trajectory)


def relax_fixed_cell(atoms, calculator, settings: RelaxSettings | None = None, *, strict: bool = False) -> RelaxResult:
    """Relax positions only (molecules in a box)."""
    settings = replace(settings or RelaxSettings(), relax_cell=False, fix_symmetry=False)
    work = atoms.copy()
    work.pbc = True
    return _relax(work, calculator, settings, None, strict=strict, keep_trajectory=False)
