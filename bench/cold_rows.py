"""Place the held-out items' atomic ID rows of a trained run (genrec.training.place_cold_rows) after the fact.

For measuring `model.cold_rows`: train a run with `model.cold_rows=start` (the default: held-out rows stay where model.id_init
started them), evaluate the cold protocol, then run this on the run and evaluate again: the same trained model,
with and without the map. Rewrites merged/ (the placed rows only) and records `cold_rows` in run.json.

    python -m bench.text_protocols --run runs/sm -c smollm2-ml-100k.yaml -s model.cold_rows=start --out a.json
    python -m bench.cold_rows --run runs/sm
    python -m bench.text_protocols --run runs/sm -c runs/sm/config.yaml --reuse --protocols cold --out b.json
"""

from __future__ import annotations

import argparse
import json

from genrec.config import apply_overrides
from genrec.run import RunDir
from genrec.training import place_cold_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="A trained run with data.cold_items and atomic IDs.")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = RunDir(args.run)
    cfg = apply_overrides(run.load_config(), ["model.cold_rows=mapped"])
    model = AutoModelForCausalLM.from_pretrained(run.merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.merged_dir)
    placed = place_cold_rows(run, cfg, model, tokenizer)
    if placed is None:
        raise SystemExit(
            f"{run.path}: no held-out atomic rows to place (data.cold_items, ids.scheme, model.id_init)"
        )
    model.save_pretrained(run.merged_dir)  # run.json's cold_rows: recorded by place_cold_rows
    run.save_config(cfg)
    print(json.dumps(placed, indent=1))


if __name__ == "__main__":
    main()
