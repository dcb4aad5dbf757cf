#!/usr/bin/env bash
# Set up genrec on a fresh machine: a virtual environment in .venv with the CPU torch pin.
# Idempotent: re-running only installs what changed. Usage: bash scripts/setup.sh [extra ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build. 2.13.0 is the local CPU wheel here;
# on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0") to keep the matching build.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
extras=${1:-dev}
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "genrec installed in .venv (extras: ${extras}); run: .venv/bin/genrec --help"
