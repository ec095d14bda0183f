#!/usr/bin/env bash
# Install aiida-automat and everything it runs with into ./.venv (or $VENV).
#
# Order matters: the CPU build of PyTorch goes in first and is pinned, so nothing later can replace it
# with a CUDA build. MatterSim is installed without its declared dependencies (they would pull
# torchvision/torchaudio, which have no CPU build here and break MatterSim's import) plus the light ones
# it really needs. Re-running is safe and fast.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[install] pip, setuptools"
pip install -q --upgrade pip setuptools wheel
echo "[install] torch 2.13.0 (CPU)"
pip install -q torch==2.13.0
echo "[install] aiida-automat and its dependencies"
pip install -q -c requirements/constraints.txt -e ".[tests,docs,benchmarks]"
echo "[install] MatterSim (optional extra, without its heavy dependencies; pip's note about the ones left out is expected)"
out=$(pip install -q --no-deps mattersim==1.2.3 2>&1) || { echo "$out" >&2; exit 1; }
echo "$out" | grep -v -e "^ERROR: pip's dependency resolver" -e "^mattersim 1.2.3 requires" -e "^WARNING: Location" || true
pip install -q -c requirements/constraints.txt e3nn torch_runstats torch-ema loguru deprecated seekpath phonopy \
    opt_einsum_fx torch_geometric torchmetrics scikit-learn
if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if (u.find_spec('torchvision') or u.find_spec('torchaudio')) else 1)"; then
    echo "[install] torchvision/torchaudio are installed in $VENV: remove them, they break MatterSim" >&2
    exit 1
fi
echo "[install] done: $("$VENV/bin/python" -c 'import aiida_automat, torch; print("aiida-automat", aiida_automat.__version__, "torch", torch.__version__)')"
