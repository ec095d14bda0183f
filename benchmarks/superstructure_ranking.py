"""Does the ranking score prefer an ordered superstructure the image shows over its sub-cell look-alike?

A 2×2 MoS₂ cell with one S in four replaced by Se, or one Mo in four by W, is imaged with the fast model
(HAADF and iDPC, 10³–10⁴ e⁻/Å², two noise seeds) and scored on the MoS₂ sub-lattice with two templates: plain
MoS₂ (its primitive cell) and the ordered cell that was imaged. Prints the plain verification NCC and the
size-neutral score (``reconstruct.scoring.size_neutral_ncc``) of each, and counts how often each picks the truth.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/superstructure_ranking.py
"""

from __future__ import annotations

import numpy as np
from ase.build import mx2

from aiida_automat.imaging.fastsim import fast_image
from aiida_automat.imaging.microscope import Microscope
from aiida_automat.lattice.measure import measure_lattice
from aiida_automat.reconstruct.scoring import candidate_score


def main():
    prim = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10)
    n = plain_right = neutral_right = 0
    for substitute, site in (("Se", 1), ("W", 0)):
        ordered = prim.repeat((2, 2, 1))
        symbols = ordered.get_chemical_symbols()
        symbols[site] = substitute
        ordered.set_chemical_symbols(symbols)
        for mode in ("haadf", "idpc"):
            mic = Microscope(mode=mode, voltage_kV=80.0, semiangle_mrad=30.0)
            for dose in (1e3, 3e3, 1e4):
                for seed in (1, 2):
                    img = fast_image(ordered, mic, 0.1, (256, 256), 17.0, dose_e_per_A2=dose,
                                     rng=np.random.default_rng(seed))
                    lat = measure_lattice(img)
                    sub = lat.vectors_px if lat.a_A < 4.0 else lat.vectors_px / 2.0  # the MoS2 sub-lattice
                    a, b = candidate_score(img, sub, prim), candidate_score(img, sub, ordered)
                    n += 1
                    plain_right += b["score"] > a["score"]
                    neutral_right += b["size_neutral_score"] > a["size_neutral_score"]
                    print(f"{substitute} {mode:5s} {dose:7.0f} seed {seed}: MoS2 {a['score']:.4f} / "
                          f"{a['size_neutral_score']:.4f}   ordered {b['score']:.4f} / {b['size_neutral_score']:.4f}")
    print(f"truth preferred: plain NCC {plain_right}/{n}, size-neutral {neutral_right}/{n}")


if __name__ == "__main__":
    main()
