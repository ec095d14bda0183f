"""Denoise a low-dose image with the automat.denoise CalcJob and the bundled checkpoint.

    verdi run examples/denoise_image.py

The checkpoint is a node (with its sha256) among the inputs, so the provenance graph says which weights
made the denoised image; the report has the gate weights of the experts and the noise estimate.
"""

import numpy as np
from aiida import orm
from aiida.engine import run_get_node
from ase.build import mx2

from aiida_automat.calculations.denoise import DenoiseCalculation, default_denoiser
from aiida_automat.data.stem_image import StemImageData
from aiida_automat.imaging.fastsim import fast_image
from aiida_automat.imaging.microscope import Microscope
from aiida_automat.profile import ensure_setup, load_code

ensure_setup()
atoms = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19)
noisy = fast_image(atoms, Microscope(mode="adf", voltage_kV=80.0), 0.1, (128, 128), 15.0, dose_e_per_A2=3e3,
                   rng=np.random.default_rng(0))
builder = DenoiseCalculation.get_builder()
builder.code = load_code("automat")
builder.image = StemImageData(noisy)
builder.model = default_denoiser()
builder.parameters = orm.Dict({"setting": "auto"})
results, node = run_get_node(builder)
report = results["report"].get_dict()
print(f"DenoiseCalculation<{node.pk}> exit status {node.exit_status}: denoised image node {results['image'].pk}")
print(f"gate weights {report['gate_weights']}, noise {report['noise_sigma_before']:.4g} -> {report['noise_sigma_after']:.4g}")
