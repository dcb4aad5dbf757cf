#!/usr/bin/env bash
# The project's test command: lint, format check, type check, the test suite, then the wheel test.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check genrec training bench tests
.venv/bin/ruff format --check genrec training bench tests
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
# the full run (no arguments, as in CI) also tests the wheel as a user installs it, away from the checkout
if [ $# -eq 0 ]; then bash scripts/wheel_test.sh; fi
