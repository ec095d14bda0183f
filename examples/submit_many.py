"""Submit one ReconstructionWorkChain per image to the daemon, wait for all, and summarise them.

    aiida-automat daemon start 2
    verdi run examples/submit_many.py IMAGE [IMAGE ...]

Without arguments it submits the bundled example three times. Candidates come from the bundled template
library (built on first use for the image's optics); no relaxation, to keep it quick.
"""

import sys
import time

from aiida.engine import submit

from aiida_automat.cli.demo import EXAMPLE
from aiida_automat.cli.library import library_for_image
from aiida_automat.cli.reconstruct import result_of
from aiida_automat.data.stem_image import StemImageData
from aiida_automat.profile import ensure_setup
from aiida_automat.workflows.reconstruction import ReconstructionWorkChain

ensure_setup()
paths = sys.argv[1:] or [EXAMPLE] * 3
nodes = []
for path in paths:
    image = StemImageData.from_file(path)
    library = library_for_image(image.to_stem_image())
    builder = ReconstructionWorkChain.get_builder_from_protocol(
        image.store(), protocol="fast", library=library, overrides={"parameters": {"relax": False}})
    nodes.append(submit(builder))
    print(f"submitted {path} as ReconstructionWorkChain<{nodes[-1].pk}>")
while not all(node.is_terminated for node in nodes):
    time.sleep(5)
for path, node in zip(paths, nodes):
    if node.is_finished_ok:
        r = result_of(node)
        print(f"{node.pk}: {path}: {r['formula']} ({r['spacegroup']}), confidence {r['confidence']:.3f}")
    else:
        print(f"{node.pk}: {path}: failed, exit {node.exit_status}: {node.exit_message}")
