#!/usr/bin/env bash
# The project's test command: lint, format check, type check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check genrec training bench tests
.venv/bin/ruff format --check genrec training bench tests
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
