#!/usr/bin/env bash
# Create .venv with the pinned stack and install ptm_nb in editable mode. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# -c keeps every transitive request for torch at the CPU wheel 2.13.0
.venv/bin/python -m pip install -q -r requirements.txt -c requirements.txt
# medmnist's metadata asks for torchvision (which pulls a CUDA torch): install it alone, without dependencies
.venv/bin/python -m pip install -q --no-deps medmnist==3.0.2
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# the kernel papermill and nbdev_test use
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "setup.sh: environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
