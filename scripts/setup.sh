#!/usr/bin/env bash
# Set up the project from nothing: a virtual environment in .venv with torch, the toolkit and its test tools.
# Idempotent: a second run only re-checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements-torch.txt
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: $(.venv/bin/python -c 'import torch, diffusers, lightning; print("torch", torch.__version__, "diffusers", diffusers.__version__, "lightning", lightning.__version__)')"
