#!/usr/bin/env bash
# Creates .venv with a CPU build of PyTorch and raftorch installed in editable mode.
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build.
# (On a GPU machine, install the torch build you want into .venv first; this script keeps it.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
