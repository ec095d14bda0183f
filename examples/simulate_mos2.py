"""Simulate an iDPC image of MoS2 with the automat.simulate CalcJob (runs the package's executable).

    verdi run examples/simulate_mos2.py
"""

from aiida import orm
from aiida.engine import run_get_node
from ase.build import mx2

from aiida_automat.calculations.simulate import SimulateCalculation
from aiida_automat.data.structures import atoms_to_structure
from aiida_automat.profile import ensure_setup, load_code

ensure_setup()
builder = SimulateCalculation.get_builder()
builder.code = load_code("automat")
builder.structure = atoms_to_structure(mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10))
builder.parameters = orm.Dict({"mode": "idpc", "voltage_kV": 80, "semiangle_mrad": 30, "pixel_size_A": 0.1,
                               "shape": [256, 256], "rotation_deg": 12.0, "method": "multislice",
                               "dose_e_per_A2": 3e4, "seed": 1})
results, node = run_get_node(builder)
image = results["image"]
print(f"SimulateCalculation<{node.pk}>: image node {image.pk}, shape {image.shape}, {image.pixel_size_A} Å/px")
