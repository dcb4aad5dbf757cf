"""What text brings: one run trained with the multi-task text rows and items held out, evaluated three ways.

Trains a recipe (default: the quickstart's, genrec/recipes/tiny.yaml) with `data.cold_items` held out and the
multi-task mix (`train.need_rows`, `train.item_text_rows`, `train.title_rows`: the recipe's own where it sets them,
MIX's otherwise), then evaluates on the test split:
`standard` (history -> next item), `need` (the test item's derived need given with the history, against the same
model on the history alone, user by user) and `cold` (the users whose test item was held out of training, over the
whole catalogue, against the retriever alone). Writes one JSON with each protocol's figures and paired differences.

    python -m bench.text_protocols --run runs/text --out bench/results/cpu_text_protocols_demo.json \\
        -s train.epochs=3 -s eval.max_users=600

Any recipe: `-c smollm2-demo.yaml`. Real datasets need their recipe's data.path (../shared/data).

Two runs on the same split (same data section and seed: the same held-out items and test users), e.g. a pretrained
base against the tiny model, compared user by user per protocol (genrec in --run minus genrec in --compare):

    python -m bench.text_protocols --run runs/sm --out sm.json --compare runs/tiny --compare-only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import paired_runs
from genrec.config import apply_overrides, load_config
from genrec.evaluation import evaluate
from genrec.pipeline import build_ids, prepare
from genrec.recommender import Recommender
from genrec.run import RunDir
from genrec.training import train

MIX = [
    "data.cold_items=0.1",
    "train.need_rows=0.5",
    "train.item_text_rows=1.0",
    "train.title_rows=0.25",
]
"""The defaults of this benchmark's mix, each applied where the recipe leaves it at 0 (a recipe's own mix wins;
-s overrides either)."""


def mix_for(cfg: Any) -> list[str]:
    """The entries of MIX the recipe `cfg` does not set itself (its value 0)."""
    out = []
    for entry in MIX:
        section, field = entry.split("=")[0].split(".")
        if getattr(getattr(cfg, section), field) == 0:
            out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="Run directory to create (trained anew).")
    ap.add_argument(
        "-c", "--config", default="tiny.yaml", help="Recipe: a YAML path or a shipped recipe name."
    )
    ap.add_argument("-s", "--set", action="append", default=[], help="section.field=value overrides.")
    ap.add_argument("--protocols", default="standard,need,cold", help="Comma-separated eval protocols.")
    ap.add_argument("--reuse", action="store_true", help="Evaluate the run as it is (already trained).")
    ap.add_argument("--out", required=True, help="JSON file to write.")
    ap.add_argument(
        "--compare",
        default=None,
        help="Another run evaluated on the same split: paired differences per protocol.",
    )
    ap.add_argument(
        "--compare-only",
        action="store_true",
        help="Neither train nor evaluate: add --compare's differences to --out from the runs' existing evaluations.",
    )
    args = ap.parse_args()
    protocols = [p for p in args.protocols.split(",") if p]
    if args.compare_only:
        if not args.compare:
            ap.error("--compare-only needs --compare")
        earlier = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        compare(earlier, Path(args.out), Path(args.run), Path(args.compare), protocols)
        return
    run = RunDir(args.run)
    recipe = load_config(args.config)
    mix = mix_for(recipe)
    cfg = apply_overrides(recipe, [*mix, *args.set])
    out: dict[str, Any] = {"command": vars(args), "mix": mix + args.set}
    if not args.reuse:
        started = time.time()
        prepare(run, cfg)
        build_ids(run, cfg)
        out["train"] = train(run, cfg)
        out["pipeline_seconds"] = round(time.time() - started, 1)
    rec = Recommender.load(run)
    for protocol in protocols:
        c = apply_overrides(cfg, [f"eval.protocol={protocol}"])
        report = evaluate(run, c, rec=rec, progress=True)
        out[protocol] = {k: report[k] for k in ("users", "results", "genrec_vs") if k in report}
        out[protocol].update(
            {k: report[k] for k in ("not_comparable", "need", "cold_items", "text_fusion") if k in report}
        )
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(
        json.dumps(
            {p: {m: round(r["ndcg@10"], 4) for m, r in out[p]["results"].items()} for p in protocols},
            indent=1,
        )
    )
    if args.compare:
        compare(out, Path(args.out), run.path, Path(args.compare), protocols)


def compare(out: dict[str, Any], path: Path, run: Path, other: Path, protocols: list[str]) -> None:
    """genrec in `run` minus genrec in `other`, user by user, for each protocol both evaluated; written into
    `out` (under `compare`), written to `path` and printed."""
    diffs = {}
    for protocol in protocols:
        stem = "test" if protocol == "standard" else f"test_{protocol}"
        diffs[protocol] = paired_runs(run, other, stem=stem)
    out["compare"] = {"other": str(other), **diffs}
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["compare"], indent=1))


if __name__ == "__main__":
    main()
