"""Formation energies, elemental references (real CHGNet) and the MP2020 energy scale."""

from __future__ import annotations

import pytest
from ase.build import mx2
from ase.neighborlist import neighbor_list

from aiida_automat.energy.formation import formation_energy
from aiida_automat.energy.references import compute_reference, reference_candidates
from aiida_automat.energy.scale import load_mp_references, mp2020_correct
from aiida_automat.errors import UnknownElement

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def test_formation_energy_arithmetic():
    result = formation_energy({"Mo": 1, "S": 2}, -7.0, {"Mo": -10.0, "S": -4.0})
    assert result.formation_energy_per_atom == pytest.approx(-7.0 - (-10.0 / 3 - 8.0 / 3))
    assert dict(result.fractions) == pytest.approx({"Mo": 1 / 3, "S": 2 / 3})
    atoms = mx2("MoS2", a=3.18, vacuum=8.0)
    assert formation_energy(atoms, -7.0, {"Mo": -10.0, "S": -4.0}) == result
    # an element is its own reference: zero formation energy
    assert formation_energy({"Mo": 4}, -10.0, {"Mo": -10.0}).formation_energy_per_atom == 0.0
    with pytest.raises(UnknownElement, match="S"):
        formation_energy(atoms, -7.0, {"Mo": -10.0})


def test_mp2020_correction_scale():
    mos2 = mx2("MoS2", a=3.18, vacuum=8.0)
    corrected = mp2020_correct(mos2, -7.0)
    # MP2020 sulfide correction ≈ -0.503 eV per S atom
    assert corrected.correction_per_atom == pytest.approx(2 * -0.503 / 3, abs=0.01)
    assert any("(S)" in name for name, _ in corrected.adjustments)
    from ase.build import bulk

    assert mp2020_correct(bulk("Mo", "bcc", a=3.16), -10.8).correction_per_atom == 0.0


@pytest.mark.parametrize("symbol", ["H", "B", "C", "N", "O", "P", "S", "Se", "Te", "As", "Bi", "Ga", "In", "Sn", "Hg", "Mo", "W", "Na", "Ar", "Si"])
def test_reference_candidates_are_sane(symbol):
    from ase.data import atomic_numbers, covalent_radii

    candidates = reference_candidates(symbol)
    assert candidates
    bond = 2 * covalent_radii[atomic_numbers[symbol]]
    for label, atoms in candidates.items():
        d = neighbor_list("d", atoms, cutoff=5.0)
        assert 0.6 * bond < d.min() < 1.8 * bond, (label, d.min(), bond)
        assert set(atoms.get_chemical_symbols()) == {symbol}


def test_reference_candidates_reject_non_elements():
    with pytest.raises(UnknownElement):
        reference_candidates("Xx")


def test_chgnet_references_and_formation_energies(shared_data):
    """μ from CHGNet near the MP DFT references; CHGNet E_form of a real 2DMatPedia GaS monolayer near
    its MP2020-corrected DFT value; MoS2 strongly bound (experiment: ΔHf ≈ -0.81 eV/atom)."""
    from ase.io import read

    from aiida_automat.energy.potentials import load_potential
    from aiida_automat.energy.relax import protocol_settings, relax_2d

    mp = load_mp_references(shared_data / "references" / "mp_elemental_references.json")
    calc, _ = load_potential("chgnet")
    refs = {s: compute_reference(s, calc) for s in ("Mo", "S", "Ga")}
    assert (refs["Mo"].label, refs["S"].label, refs["Ga"].label) == ("bcc", "S8-ring", "alpha-Ga")
    for symbol, ref in refs.items():
        assert abs(ref.energy_per_atom - mp[symbol]) < 0.2, (symbol, ref.energy_per_atom, mp[symbol])
    mu = {s: r.energy_per_atom for s, r in refs.items()}

    frames = read(shared_data / "structures" / "2dmatpedia_subset.extxyz", index=":")
    candidates = [
        f for f in frames if f.info.get("formula_pretty") == "GaS" and {"energy_per_atom", "decomposition_energy"} <= set(f.info)
    ]
    gas = min(candidates, key=lambda f: f.info["decomposition_energy"])
    dft = mp2020_correct(gas, gas.info["energy_per_atom"]).corrected_energy_per_atom
    dft_form = formation_energy(gas, dft, mp).formation_energy_per_atom
    relaxed = relax_2d(gas, calc, protocol_settings("moderate"))
    ml_form = formation_energy(relaxed.atoms, relaxed.energy_per_atom, mu).formation_energy_per_atom
    assert dft_form < -0.5
    assert abs(ml_form - dft_form) < 0.1, (ml_form, dft_form)

    mos2 = mx2("MoS2", kind="2H", a=3.18, thickness=3.13, vacuum=8.0)
    relaxed = relax_2d(mos2, calc, protocol_settings("moderate"))
    assert -1.4 < formation_energy(relaxed.atoms, relaxed.energy_per_atom, mu).formation_energy_per_atom < -0.7
