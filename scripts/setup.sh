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
.venv/bin/python -m pip install -q -e ".[test,docs]"
# Fashion-MNIST, the offline data of the quick profile (raftorch reproduce --profile quick):
# Debian's dataset-fashion-mnist package, installed where this runs as root with apt and the
# files are not there yet (RAFTORCH_NO_APT=1 skips it; elsewhere use --download or --data-dir).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && [ "${RAFTORCH_NO_APT:-0}" != 1 ]; then
  echo "setup: installing Debian's dataset-fashion-mnist (the quick profile's data)"
  { apt-get -qq update && apt-get -qq install -y dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "setup: note: could not install dataset-fashion-mnist; the quick profile then needs --download or a data folder"
fi
