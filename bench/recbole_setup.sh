#!/usr/bin/env bash
# RecBole 1.2.1 in its own venv (.venv-recbole) for bench/recbole_peer.py: it pins numpy<2 and
# pandas<2.3, which genrec's venv does not, so the two never share an environment.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-recbole/bin/python ] || python3 -m venv .venv-recbole
.venv-recbole/bin/pip install -q torch==2.13.0 recbole==1.2.1 'numpy<2' 'pandas<2.3' 'scipy<1.15' setuptools==78.1.1
.venv-recbole/bin/python -c "import recbole; print('recbole', recbole.__version__)"
