#!/usr/bin/env bash
# Assemble docs/benchmarks.md from the per-stage sections each benchmark script's run produced.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{
cat <<'HEAD'
# Benchmarks

Every figure below comes with the command that produced it (scripts in `benchmarks/`). Machine: the
project's 2-core CPU machine (no GPU), usually shared with other jobs while the benchmark ran, so times are
upper bounds. Dates are when the run finished (UTC).

## Where we stand against AutoMat (arXiv 2505.12650)

| quantity | AutoMat (published, its own pipeline) | aiida-automat now | where |
|---|---|---|---|
| structure success | 83.2 % | full pipeline 94.6 % (96.1 % at ≥ 10⁴ e⁻/Å², 90.0 % at 3·10³; 480 multislice images of 60 monolayers, converged reference simulation since session 9, doses 3·10³–6·10⁴, iDPC 94.2 %, ADF 95.0 %; `bench run` on the stem2mat-small preset); answer or a reported alternative 97.5 %; with the true template 98 % there and 100 % on the reconstruction benchmark; AutoMat-style re-implementation 10 % on the same images | Pipeline and Reconstruction sections |
| projected RMSD | 0.11 Å | median 0.000 Å (atoms on special positions), mean 0.016 Å over the right answers with the true template on the 480-image set (0.018 Å for the pipeline's right answers); 90th percentile ≤ 0.019 Å at ≥ 3·10⁴ e⁻/Å², 0.032 Å HAADF 10⁴ (light N4O8 layer) on the reconstruction benchmark | Reconstruction and Pipeline sections |
| formation-energy MAE | 321.6 meV/atom (pipeline) | pipeline 141 meV/atom on the 480-image set (wrong-formula answers dominate), oracle (CHGNet on the true structures) 76; CHGNet on 150 structures: 113 single point, 151 relaxed (MP2020 scale) | Pipeline and Energies sections |
| template retrieval top-1 / top-5 | — (AutoMat's code: blob-distance histogram; same benchmark 0–10 % / 5–15 %) | retrieval stage 70 % / 98 % in library (at 3·10⁴ e⁻/Å²: 72 % / 98 %; converged multislice, ±8 % calibration error); the product's final answer 74 % (78 %), the answer or a reported alternative 92 % (98 %) | Retrieval section |

HEAD
for f in bench_simulation bench_denoise bench_lattice bench_atomap bench_reconstruct bench_retrieval bench_pipeline bench_energy bench_dft bench_daemon bench_reliability_inputs; do
    [ -f "docs/_sections/$f.md" ] || continue
    echo
    sed -e 's/^# /## /' "docs/_sections/$f.md"
    echo
done
} > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
