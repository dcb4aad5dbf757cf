#!/usr/bin/env bash
# Quality on one GPU: train + evaluate (genrec and all four baselines, same split, full ranking) for
# every prepared run named in RUNS, all at once on the one GPU (small models leave it mostly idle).
# Prepare the runs on any machine first (prepare and build-ids need the raw data and the text encoder;
# training and evaluation need only the run directory):
#   for c in ml-100k amazon-beauty amazon-scientific; do ...; done   (see genrec/recipes/*-gpu.yaml)
# Then on the GPU machine (trl + datasets importable, e.g. PYTHONPATH=/tmp/site):
#   RUNS="runs/beauty-gpu runs/ml-100k-gpu runs/scientific-gpu" OUT=/tmp/q bash bench/gpu_quality.sh
# Writes $OUT/<run>.log per run and $OUT/quality.tar.gz (eval JSON, report, plots, run.json, loss log).
# DEADLINE (seconds, default 560): each run's evaluation is stopped so that the script ends by then.
set -uo pipefail
RUNS=${RUNS:-"runs/beauty-gpu runs/ml-100k-gpu runs/scientific-gpu"}
OUT=${OUT:-/tmp/genrec-quality}
DEADLINE=${DEADLINE:-560}
EXTRA_SET=${EXTRA_SET:-}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 TQDM_MININTERVAL=20 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
nvidia-smi -L 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, datasets, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

one() {
  local run=$1 name sets=()
  name=$(basename "$run")
  for s in $EXTRA_SET; do sets+=(-s "$s"); done
  {
    echo "== train $run ($(date -u +%T))"
    python3 -m genrec train --run "$run" "${sets[@]}" || { echo "TRAIN FAILED: $?"; return; }
    local left=$(( DEADLINE - ($(date +%s) - START) - 15 ))
    echo "== evaluate $run, ${left}s left ($(date -u +%T))"
    if [ "$left" -gt 30 ]; then
      timeout "$left" python3 -m genrec evaluate --run "$run" "${sets[@]}" || echo "EVALUATE FAILED or timed out: $?"
    fi
    echo "== done $run ($(date -u +%T))"
  } > "$OUT/$name.log" 2>&1
}

for run in $RUNS; do one "$run" & done
wait
for run in $RUNS; do
  name=$(basename "$run")
  python3 - "$run" <<'PY' || true
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
meta = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
print(run.name, "train:", {k: meta.get("train", {}).get(k) for k in ("steps", "epochs", "seconds", "eval_loss", "stopped_by_time_budget", "best_step", "stopped_early")})
f = run / "eval_test.json"
if f.exists():
    rep = json.loads(f.read_text())
    print(f"  users {rep['users']}, genrec {rep['genrec_users_per_s']} users/s")
    for name, r in rep["results"].items():
        print(f"  {name:11s} R@10 {r['recall@10']:.4f}  N@10 {r['ndcg@10']:.4f}  R@20 {r['recall@20']:.4f}")
else:
    print("  no eval_test.json")
PY
  tail -3 "$OUT/$name.log"
done
files=()
for run in $RUNS; do
  for f in eval_test.json report_test.md eval_test_metrics.png eval_test_longtail.png train_loss.png run.json train_log.jsonl config.yaml; do
    [ -f "$run/$f" ] && files+=("$run/$f")
  done
done
tar -czf "$OUT/quality.tar.gz" "${files[@]}" 2>/dev/null
echo "total $(( $(date +%s) - START ))s"
