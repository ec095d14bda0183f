"""2D relaxation with real CHGNet: MoS2 lattice constant, fixed layer normal, protocols, convergence flags."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import mx2

from aiida_automat.energy.potentials import load_potential
from aiida_automat.energy.relax import RelaxSettings, check_layer_geometry, protocol_settings, relax_2d
from aiida_automat.errors import ConvergenceError

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def chgnet():
    calc, _ = load_potential("chgnet")
    return calc


def strained_mos2(a=3.30):
    atoms = mx2("MoS2", kind="2H", a=a, thickness=3.3, vacuum=8.0)
    atoms.rattle(0.02, seed=3)
    return atoms


def test_chgnet_relaxes_mos2_lattice_constant(chgnet):
    start = strained_mos2()
    result = relax_2d(start, chgnet, protocol_settings("moderate"))
    a = np.linalg.norm(result.atoms.cell[0])
    assert abs(a - 3.18) / 3.18 < 0.02, a
    assert result.converged and result.max_force < 0.05 + 1e-9
    assert result.energy < result.initial_energy
    # the layer normal and vacuum are untouched, a and b stay in-plane and equal (hexagonal)
    np.testing.assert_allclose(result.atoms.cell[2], start.cell[2], atol=1e-8)
    assert abs(result.atoms.cell[0][2]) < 1e-8 and abs(result.atoms.cell[1][2]) < 1e-8
    assert np.linalg.norm(result.atoms.cell[1]) == pytest.approx(a, rel=1e-3)
    assert tuple(result.atoms.pbc) == (True, True, False)
    # trajectory: one frame per step plus the start, energies recorded
    assert len(result.trajectory) == result.steps + 1
    energies = [f.get_potential_energy() for f in result.trajectory]
    assert energies[-1] == pytest.approx(result.energy, abs=1e-6)
    assert result.summary()["a"] == pytest.approx(a)


def test_fix_symmetry_keeps_space_group(chgnet):
    import spglib

    start = mx2("MoS2", kind="2H", a=3.25, thickness=3.1, vacuum=8.0)
    result = relax_2d(start, chgnet, RelaxSettings(fmax=0.05, steps=200, fix_symmetry=True))
    cell = (result.atoms.cell[:], result.atoms.get_scaled_positions(), result.atoms.numbers)
    assert spglib.get_spacegroup(cell, symprec=1e-3) == "P-6m2 (187)"
    assert abs(np.linalg.norm(result.atoms.cell[0]) - 3.18) / 3.18 < 0.02


def test_step_limit_flags_or_raises(chgnet):
    settings = RelaxSettings(fmax=0.001, steps=2)
    result = relax_2d(strained_mos2(), chgnet, settings)
    assert not result.converged and result.steps == 2
    with pytest.raises(ConvergenceError, match="not relaxed"):
        relax_2d(strained_mos2(), chgnet, settings, strict=True)


def test_positions_only_keeps_cell(chgnet):
    start = strained_mos2()
    result = relax_2d(start, chgnet, RelaxSettings(relax_cell=False, steps=50))
    np.testing.assert_allclose(result.atoms.cell[:], start.cell[:])
    assert result.stress is None


def test_protocols():
    fast, precise = protocol_settings("fast"), protocol_settings("precise")
    assert fast.fmax > protocol_settings().fmax > precise.fmax
    assert precise.optimizer == "BFGS" and precise.fix_symmetry
    assert protocol_settings("fast", steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown relax settings"):
        protocol_settings("fast", temperature=300)
    with pytest.raises(ValueError, match="unknown relax protocol"):
        protocol_settings("sloppy")
    with pytest.raises(ValueError, match="optimizer"):
        RelaxSettings(optimizer="MDMin")


def test_tilted_layer_normal_is_rejected():
    atoms = mx2("MoS2", a=3.18, vacuum=8.0)
    cell = atoms.cell[:].copy()
    cell[2, 0] = 1.0
    atoms.set_cell(cell)
    with pytest.raises(ValueError, match="perpendicular"):
        check_layer_geometry(atoms)
