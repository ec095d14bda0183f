"""Make the bundled example image (aiida_automat/resources/example/): a multislice HAADF image of MoS2.

Reproducible: fixed seed; run with `.venv/bin/python scripts/make_example.py`. The image is what the
README's demo reconstructs. It carries its calibration in a JSON sidecar, the way many labs export
images, so the demo exercises the same reader a user's file goes through.
"""

import json
import pathlib

import numpy as np
from ase.build import mx2

from aiida_automat.imaging import Microscope
from aiida_automat.imaging.simulate import simulate_image

OUT = pathlib.Path(__file__).resolve().parents[1] / "aiida_automat" / "resources" / "example"


def main():
    atoms = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10)
    microscope = Microscope(mode="haadf", voltage_kV=60.0, semiangle_mrad=30.0, source_size_A=0.5)
    image = simulate_image(atoms, microscope, pixel_size_A=0.12, shape=(256, 256), rotation_deg=17.0,
                           offset_A=(0.7, 1.9), method="multislice", dose_e_per_A2=2e4,
                           rng=np.random.default_rng(20261121))
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(OUT / "mos2_haadf.npy", image.data.astype(np.float32))
    fov_nm = 256 * 0.12 / 10
    sidecar = {
        "material_type": "MoS2 monolayer (simulated, abTEM multislice)",
        "experiment_type": "HAADF-STEM",
        "experimental_details": {
            "voltage": "60 kV",
            "convergence_semiangle": "30 mrad",
            "spatial_info": {"field_of_view_x": fov_nm, "field_of_view_y": fov_nm, "field_of_view_units": "nm"},
        },
        "simulation": {"rotation_deg": 17.0, "dose_e_per_A2": 2e4, "seed": 20261121, "a_A": 3.18,
                       "script": "scripts/make_example.py"},
    }
    (OUT / "mos2_haadf.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
