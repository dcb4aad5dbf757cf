#!/usr/bin/env bash
# The GPU benchmark suite, run on the lent GPU machine after ../shared/tools/device-vllm.sh has
# unpacked vLLM 0.26 to /tmp/site. Needs a slim copy of a run (data, IDs, embeddings, tokenizer):
#   mkdir -p runs/gpu && cp -r runs/demo/{config.yaml,catalog.parquet,interactions.parquet,\
#     item_embeddings.npy,item_ids.json,codebooks.npz,run.json,merged} runs/gpu/
# then, on the device: RUN=runs/gpu OUT=$OUT bash bench/gpu_suite.sh
# 1. replaces runs/gpu/merged with a random-init Qwen2 of ~105M parameters (same tokenizer, bf16),
# 2. engine throughput/latency: genrec constrained beam vs greedy vs vLLM beam_search (same width),
# 3. the HF engine's constrained beam search on the same GPU,
# 4. `genrec serve --backend vllm` + bench/load.py at 1/8/32/128 clients (SOAK=N adds an N-request soak).
set -euo pipefail
RUN=${RUN:-runs/gpu}
OUT=${OUT:-/tmp/genrec-bench}
MODEL=${MODEL:-1024,8,16,4,2816}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 - <<PY
from pathlib import Path
from bench.engine_throughput import build_model
from genrec.run import RunDir
run = RunDir("$RUN")
build_model(run, "$MODEL", Path("$RUN/merged"))
PY
timeout 240 python3 -m bench.engine_throughput --run "$RUN" --engine vllm --users 2000 --beam 10 --batch 1000 \
  --out "$OUT/engine_vllm.json" 2>&1 | grep -v -E "^(INFO|WARNING|\(EngineCore)" | tail -40
timeout 200 python3 -m bench.engine_throughput --run "$RUN" --engine hf --users 2000 --beam 10 --batch 256 \
  --out "$OUT/engine_hf.json" 2>&1 | tail -25
python3 -c "
from serve.main import ServeArgs, serve
serve(ServeArgs(run='$RUN', backend='vllm', port=8011, max_queue=4096, max_batch=256, timeout_s=120))
" > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 180); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 1; done
curl -sf http://127.0.0.1:8011/health
timeout 150 python3 -m bench.load --run "$RUN" --url http://127.0.0.1:8011 --model gpu --concurrency 1,8,32,128 \
  --requests 300 --out "$OUT/load_vllm.json" | tail -8
if [ "${SOAK:-0}" != 0 ]; then
  timeout 400 python3 -m bench.load --run "$RUN" --url http://127.0.0.1:8011 --model gpu --concurrency 64 \
    --requests "$SOAK" --out "$OUT/soak_vllm.json" | tail -3
fi
curl -sf http://127.0.0.1:8011/metrics | grep -E "^genrec_(requests_total|invalid_items_total|items_returned_total)" | tee "$OUT/metrics.txt"
kill -TERM $SERVER; wait $SERVER || true
tail -5 "$OUT/server.log"
