"""Reconstruct the bundled example image with the ReconstructionWorkChain.

    verdi run examples/reconstruct_example.py

Uses the current profile (``aiida-automat setup`` creates one if you have none). The template library for
the image's optics is built on first use and then reused.
"""

from aiida import orm
from aiida.engine import run_get_node

from aiida_automat.cli.demo import EXAMPLE
from aiida_automat.cli.library import library_for_image
from aiida_automat.data.stem_image import StemImageData
from aiida_automat.profile import ensure_setup, load_code
from aiida_automat.workflows.reconstruction import ReconstructionWorkChain

ensure_setup()
image = StemImageData.from_file(EXAMPLE)
library = library_for_image(image.to_stem_image())
builder = ReconstructionWorkChain.get_builder_from_protocol(
    image.store(), protocol="fast", library=library, code=load_code("automat"),
    overrides={"parameters": {"relax": True}},
)
results, node = run_get_node(builder)
print(f"{node.process_label}<{node.pk}> exit status {node.exit_status}")
if node.is_finished_ok:
    diag = results["diagnostics"].get_dict()
    print("structure:", results["structure"].get_formula(), diag["spacegroup"], diag["lattice"])
    print("verification:", results["verification"]["score"])
    print("energies:", {k: results["energies"][k] for k in ("energy_per_atom", "formation_energy_per_atom")})
    print("agent trace:", [d["action"] for d in results["trace"].get_list()])
    print(f"provenance graph: verdi node graph generate {node.pk}")
