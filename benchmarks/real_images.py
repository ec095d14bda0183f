"""The product on real experimental images: the three HAADF images of MoS2 in ``../shared/data/real``.

Each image goes through the rules agent exactly as ``bench run`` does it (``bench.agent_loop.run_agent``:
lattice, retrieval of the top 5 from the bundled library built for the image's optics, reconstruction,
verification, choice), twice: with no chemical knowledge, and with the elements a microscopist knows (Mo, S;
the library restricted to templates made of them, as ``--elements Mo,S`` does). Prints the answer, its
ranking score, and where the first MoS2 template ranks in retrieval.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_images.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES = ("real/mos2_temul/example_Se_implanted_MoS2.dm3", "real/mos2_scilink/MoS2_stem_Exp-000-2.npy",
          "real/mos2_scilink/MoS2_stem_Exp-001-5.npy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = ap.parse_args(argv)
    data = pathlib.Path(args.shared) / "data"
    if not all((data / rel).is_file() for rel in IMAGES):
        print(f"the real images are not under {data}: nothing to do")
        return 1
    from aiida_automat.agent.rules import RulesPolicy
    from aiida_automat.bench.agent_loop import run_agent
    from aiida_automat.imaging.io import read_image
    from aiida_automat.imaging.structures import reduced_formula
    from aiida_automat.lattice.measure import measure_lattice
    from aiida_automat.library.build import build_library
    from aiida_automat.library.retrieve import _element_filter, retrieve

    libraries = {}
    print("| image | elements given | answer | template | ranking score | first MoS2 template in retrieval (of 50) | s |")
    print("|---|---|---|---|---|---|---|")
    for rel in IMAGES:
        img = read_image(data / rel)
        key = (img.microscope.voltage_kV, img.microscope.semiangle_mrad, img.microscope.mode)
        if key not in libraries:
            libraries[key] = build_library(name="bundled", microscope=img.microscope)
        lib = libraries[key]
        lat = measure_lattice(img)
        for elements in (None, "Mo,S"):
            q = lib if elements is None else lib.subset([int(i) for i in _element_filter(lib, elements).nonzero()[0]])
            ranked = retrieve(img, q, lattice=lat, k=50, propose_outside=False).candidates
            first = next((i + 1 for i, c in enumerate(ranked) if c.formula == "MoS2"), None)
            t = time.perf_counter()
            res = run_agent(img, q, RulesPolicy(), k=5)
            formula = reduced_formula(res.atoms) if res.atoms is not None else "—"
            score = "—" if res.score is None else f"{res.score:.3f}"
            print(f"| {pathlib.Path(rel).name} | {elements or 'no'} | {formula} | {res.template_id} | {score} | "
                  f"{first or '—'} | {time.perf_counter() - t:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
