"""How faint a lattice does ``measure_lattice`` still find? Graphene (the weakest common 2D crystal) at low dose.

Fast-model images of graphene (300 kV, 25 mrad, 0.1 Å/px, 256²), ADF, HAADF and iDPC (default detectors), at 10³, 2·10³ and 5·10³ e⁻/Å²,
``--seeds`` noise seeds and rotations each, measured twice: as is, and with the joint weak-lattice test switched off
(peak-by-peak detection only, as before session 10). Counts images whose measured lattice is graphene's
(a = 2.46 Å ± 2 %, 120°), a sub-lattice of it (another lattice found, e.g. the 1.42 Å √3 one of the strong second
orders), or none; and the false lattices found in ``--noise`` white-noise images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weak_lattice.py --seeds 10 --noise 100
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--noise", type=int, default=100)
    args = ap.parse_args(argv)
    from ase.build import graphene

    import aiida_automat.lattice.measure as measure
    from aiida_automat.errors import LatticeNotFound
    from aiida_automat.imaging.fastsim import fast_image
    from aiida_automat.imaging.image import StemImage
    from aiida_automat.imaging.microscope import Microscope

    joint = measure._weak_lattice_peaks
    off = lambda *a: (np.zeros(0, int), np.zeros(0, int), None)  # noqa: E731

    def outcome(img):
        try:
            lat = measure.measure_lattice(img)
        except LatticeNotFound:
            return "none"
        right = abs(lat.a_A / 2.46 - 1) < 0.02 and abs(lat.b_A / 2.46 - 1) < 0.02 and abs(lat.gamma_deg - 120) < 1.5
        return "graphene" if right else "other"

    atoms = graphene(a=2.46, vacuum=10)
    atoms.pbc = True
    print("| mode | dose e⁻/Å² | n | peak by peak: graphene / other / none | joint test: graphene / other / none |")
    print("|---|---|---|---|---|")
    for mode in ("adf", "haadf", "idpc"):
        for dose in (1e3, 2e3, 5e3):
            counts = {"off": Counter(), "on": Counter()}
            for seed in range(args.seeds):
                img = fast_image(atoms, Microscope(mode=mode), 0.1, (256, 256), 13.0 + 7 * seed, dose_e_per_A2=dose,
                                 rng=np.random.default_rng(seed))
                for key, fn in (("off", off), ("on", joint)):
                    measure._weak_lattice_peaks = fn
                    counts[key][outcome(img)] += 1
            measure._weak_lattice_peaks = joint
            cell = lambda c: f"{c['graphene']} / {c['other']} / {c['none']}"  # noqa: E731
            print(f"| {mode} | {dose:.0e} | {args.seeds} | {cell(counts['off'])} | {cell(counts['on'])} |")
    rng = np.random.default_rng(11)
    false = 0
    for _ in range(args.noise):
        img = StemImage(data=rng.normal(size=(256, 256)).astype(np.float32), pixel_size_A=0.1,
                        microscope=Microscope(mode="haadf"))
        try:
            measure.measure_lattice(img)
            false += 1
        except LatticeNotFound:
            pass
    print(f"\nwhite-noise images: {false} false lattice(s) in {args.noise}")


if __name__ == "__main__":
    main()
