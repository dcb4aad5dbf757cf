"""Quality on real data: genrec and its baselines on the same chronological leave-one-out split.

    python -m bench.quality                                   # every dataset present in ../shared/data
    python -m bench.quality --datasets scientific --set train.epochs=4
    python -m bench.quality --reuse                           # collect runs already evaluated, evaluate trained ones

For each dataset: prepare -> build-ids -> train -> evaluate, with the recipe's eval.baselines in the same
command (popularity, item-kNN, a Markov chain, the retriever alone, and SASRec but in Beauty's CPU recipe),
using the dataset's best CPU recipe in genrec/recipes/ (the `*-atomic.yaml` ones, and
`amazon-beauty-semantic.yaml` for Beauty with collaborative semantic IDs; `--set` overrides any field). Writes
bench/results/quality_<dataset>.json and prints a markdown table with the published figures from
../shared/data/README.md next to ours. A dataset whose files are absent is skipped with a message
(the data's terms forbid copying it into this repository, so CI never has it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import save

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
BEAUTY_PUBLISHED = {
    "TIGER (Rajput et al. 2023)": {
        "recall@5": 0.0454,
        "ndcg@5": 0.0321,
        "recall@10": 0.0648,
        "ndcg@10": 0.0384,
    },
    "SASRec (as reported by TIGER)": {"recall@10": 0.0605, "ndcg@10": 0.0318},
    "cross-entropy SASRec (stretch)": {"recall@10": 0.08, "ndcg@10": 0.045},
}
DATASETS = {
    # name: (recipe, folder under ../shared/data, published figures under the same protocol)
    "beauty": (
        "genrec/recipes/amazon-beauty-atomic.yaml",  # ~45 min on the 2-core CPU
        "amazon-beauty",
        BEAUTY_PUBLISHED,
    ),
    # the Beauty setting (ids only: collaborative semantic IDs); ~32 min on the 2-core CPU
    "beauty-semantic": ("genrec/recipes/amazon-beauty-semantic.yaml", "amazon-beauty", BEAUTY_PUBLISHED),
    "ml-100k": ("genrec/recipes/ml-100k-atomic.yaml", "ml-100k", {}),  # ~12 min on the 2-core CPU
    "scientific": ("genrec/recipes/amazon-scientific-atomic.yaml", "amazon-scientific", {}),
}
METRICS = [
    "recall@5",
    "ndcg@5",
    "recall@10",
    "ndcg@10",
    "recall@20",
    "ndcg@20",
    "mrr",
    "validity",
    "coverage@20",
]


def run_dataset(name: str, *, runs: Path, overrides: list[str], reuse: bool) -> dict[str, Any] | None:
    from genrec.cli import _config
    from genrec.evaluation import evaluate
    from genrec.pipeline import build_ids, prepare, train_retriever
    from genrec.run import RunDir
    from genrec.training import train

    recipe, folder, published = DATASETS[name]
    if not (SHARED / folder).is_dir():
        print(f"[{name}] skipped: {SHARED / folder} is absent (benchmarks read ../shared/data only)")
        return None
    run = RunDir(runs / name)
    report_file = run / "eval_test.json"
    started = time.time()
    if reuse and report_file.is_file():
        print(f"[{name}] reusing {report_file}")
        cfg = run.load_config()
    elif reuse and run.meta().get("train") and run.merged_dir.is_dir():  # trained, evaluation not finished
        print(
            f"[{name}] reusing the trained model in {run.merged_dir}; evaluating (an interrupted one resumes)"
        )
        cfg = run.load_config()
        evaluate(run, cfg, resume=True)
    else:
        cfg = _config(run, Path(recipe), overrides, fresh=True)
        cfg.data.path = str(SHARED / folder)
        prepare(run, cfg)
        build_ids(run, cfg)
        train_retriever(run, cfg)  # retrieval.source's collaborative model (none for `text`)
        train(run, cfg)
        evaluate(
            run, cfg
        )  # chooses the fusion weight on the validation split first (retrieval.fusion_weight=auto)
    report = json.loads(report_file.read_text())
    return {
        "dataset": name,
        "recipe": recipe,
        "overrides": overrides,
        "wall_s": round(time.time() - started, 1),
        "users": report["users"],
        "items": report["items"],
        "beam_width": report["beam_width"],
        "train": run.meta().get("train", {}),
        "results": {k: {m: v.get(m) for m in METRICS} for k, v in report["results"].items()},
        "published": published,
    }


def table(out: dict[str, Any]) -> str:
    cols = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr"]
    lines = [f"**{out['dataset']}** ({out['users']} test users, {out['items']} items, full ranking)", ""]
    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    for model, m in out["results"].items():
        lines.append(f"| {model} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |")
    for model, m in out["published"].items():
        lines.append(f"| *{model}, published* | " + " | ".join(fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--runs", type=Path, default=Path("runs"), help="Where the runs go (runs/<dataset>).")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="Config override, repeatable."
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="Use what a run already has: its eval_test.json when present; else its trained model, evaluated "
        "(going on from an interrupted evaluation's kept lists); else everything is made again.",
    )
    p.add_argument("--out", default="bench/results", help="Folder for quality_<dataset>.json.")
    args = p.parse_args(argv)
    done = 0
    for name in args.datasets:
        out = run_dataset(name, runs=args.runs, overrides=args.overrides, reuse=args.reuse)
        if out is None:
            continue
        save(f"{args.out}/quality_{name}.json", out)
        print(table(out))
        done += 1
    if not done:
        print("no dataset found under ../shared/data; nothing measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
