#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh virtual environment (no system or
# project site-packages, so missing package data or a missing dependency fails here), and run the CLI from a
# temporary directory away from the checkout: --help, a tiny quickstart (shipped recipe + small overrides) and
# `prompts list` (the shipped templates). Usage: bash scripts/wheel_test.sh (PYTHON: the interpreter, 3.11+)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$SECONDS
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip wheel -q --no-deps . -w "$work/dist"
# the same torch pin as scripts/setup.sh (an unpinned torch pulls a multi-GB CUDA build), then the wheel's deps;
# --no-compile: no byte-compiling of every module of torch and transformers up front (what runs compiles)
"$work/venv/bin/python" -m pip install -q --no-compile "${TORCH_SPEC:-torch==2.13.0}"
"$work/venv/bin/python" -m pip install -q --no-compile "$work"/dist/genrec-*.whl
echo "wheel built and installed in $((SECONDS - started)) s"
cd "$work"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
genrec=("$work/venv/bin/genrec")
"${genrec[@]}" --help >/dev/null
# the quickstart's shipped recipe (tiny.yaml), cut to seconds: the conftest's TINY sizes, no text encoder
"${genrec[@]}" quickstart --run runs/wheel \
  -s data.synthetic_items=240 -s data.synthetic_users=150 -s data.kcore=2 \
  -s ids.levels=2 -s ids.codes=8 -s ids.embedding=collaborative -s ids.collaborative_dim=16 \
  -s prompt.max_history=4 -s model.hidden_size=64 -s model.num_layers=2 -s model.num_heads=2 \
  -s model.num_kv_heads=1 -s model.intermediate_size=96 -s model.vocab_size=400 \
  -s train.max_steps=20 -s train.batch_size=16 -s train.examples_per_user=4 \
  -s eval.beam_width=10 -s "eval.ks=[5,10]" -s eval.max_users=20 -s eval.batch_size=16 -s eval.sasrec_epochs=1
listing=$("${genrec[@]}" prompts list --run runs/wheel)
echo "$listing"
for name in default need item_text; do  # shipped templates, read from the installed package
  grep -q "$name" <<<"$listing" || { echo "wheel test: template $name missing from prompts list" >&2; exit 1; }
done
"${genrec[@]}" prepare --run runs/named -c tiny.yaml -s data.synthetic_items=240 -s data.synthetic_users=150 \
  -s data.kcore=2 -s ids.embedding=collaborative >/dev/null  # a shipped recipe by name, from a directory without it
test -f runs/named/config.yaml
# the server from the installed package: its HTTP stack (httptools, uvloop) must come with the wheel's dependencies
port=$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${genrec[@]}" serve --run runs/wheel --port "$port" --warmup 0 --model-name wheel >serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
answer=""
for _ in $(seq 120); do
  answer=$("$work/venv/bin/python" - "$port" <<'PY' 2>/dev/null
import json, sys, urllib.request
body = json.dumps({"model": "wheel", "messages": [{"role": "user", "content": "something new"}], "n_items": 3})
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions", body.encode(),
                             {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=30))
print(len(out["recommendations"]))
PY
) && break
  kill -0 $server 2>/dev/null || { cat serve.log >&2; echo "wheel test: genrec serve exited" >&2; exit 1; }
  sleep 1
done
[[ "$answer" == 3 ]] || { cat serve.log >&2; echo "wheel test: no chat answer from genrec serve" >&2; exit 1; }
kill $server
echo "wheel test: genrec serve answered a chat completion with 3 items"
echo "wheel test passed in $((SECONDS - started)) s"
