"""genrec's SASRec baseline against the reference implementation (RecBole 1.2.1) on the same split.

    bash bench/recbole_setup.sh                      # once: RecBole in its own venv (.venv-recbole)
    python -m bench.recbole_peer --recbole-epochs 20   # ml-100k from ../shared/data

1. Loads ml-100k with the ml-100k recipe's cleaning (genrec.data), so both see identical sequences.
2. Exports them as RecBole atomic files (`user_id:token item_id:token timestamp:float`, the timestamp
   being the position in the user's sequence, so RecBole's time order equals ours).
3. Runs RecBole's SASRec with `loss_type: CE`, `eval_args: {split: {LS: valid_and_test}, order: TO,
   mode: full}` in the separate venv (RecBole pins numpy<2 / pandas<2.3, which genrec does not).
4. Trains genrec's SASRec exactly as `genrec evaluate` does (SASRecConfig: the same sizes as the
   RecBole model) on the same training part (each user's sequence minus the validation and test
   items, as RecBole's LS split does), keeps the epoch with the best validation NDCG@10 (RecBole's
   early stopping does the same) and scores the same test users with full ranking minus seen items.
5. Prints both side by side and writes bench/results/recbole_peer.json.

Skips cleanly when ../shared/data/ml-100k or the RecBole venv is absent.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save
from bench.quality import SHARED

ROOT = Path(__file__).resolve().parent.parent
RECBOLE_PY = ROOT / ".venv-recbole" / "bin" / "python"
KS = (10, 20)
SIZES: dict[str, Any] = {
    "hidden": 64,
    "layers": 2,
    "heads": 2,
    "dropout": 0.2,
    "max_len": 50,
    "batch_size": 256,
    "lr": 1e-3,
}
"""The same model for both: genrec's SASRecConfig defaults, in RecBole's terms too."""

RUNNER = textwrap.dedent(
    """
    import json, sys
    from recbole.quick_start import run_recbole
    cfg = json.loads(sys.argv[1])
    out = run_recbole(model="SASRec", dataset=cfg.pop("dataset"), config_dict=cfg, saved=False)
    print("RECBOLE_RESULT " + json.dumps({k: {m: float(v) for m, v in out[k].items()} if isinstance(out[k], dict)
                                         else out[k] for k in ("best_valid_result", "test_result")}))
    """
)


def export_atomic(data: Any, folder: Path, name: str) -> Path:
    """RecBole atomic .inter file of the sequences; positions as timestamps keep the order exact."""
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user, seq in zip(data.users, data.sequences, strict=True):
        lines += [f"{user}\t{data.catalog.item_ids[i]}\t{t}" for t, i in enumerate(seq)]
    (d / f"{name}.inter").write_text("\n".join(lines) + "\n")
    return d


def recbole_config(
    folder: Path,
    name: str,
    *,
    epochs: int,
    sizes: dict[str, Any],
    eval_step: int = 1,
    stopping_step: int = 10,
) -> dict[str, Any]:
    return {
        "dataset": name,
        "data_path": str(folder),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": sizes["max_len"],
        "hidden_size": sizes["hidden"],
        "inner_size": sizes["hidden"] * 4,
        "n_layers": sizes["layers"],
        "n_heads": sizes["heads"],
        "hidden_dropout_prob": sizes["dropout"],
        "attn_dropout_prob": sizes["dropout"],
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "epochs": epochs,
        "train_batch_size": sizes["batch_size"],
        "learning_rate": sizes["lr"],
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Recall", "NDCG", "MRR"],
        "topk": list(KS),
        "valid_metric": "NDCG@10",
        "eval_step": eval_step,
        "stopping_step": stopping_step,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "device": "cpu",
        "use_gpu": False,
        "seed": 0,
        "reproducibility": True,
        "show_progress": False,
        "checkpoint_dir": str(folder / "saved"),
        "log_wandb": False,
    }


def run_recbole(cfg: dict[str, Any], timeout_s: int, *, log: Path | None = None) -> dict[str, Any]:
    """Run RecBole in its venv, inside the data folder (it writes log/ and log_tensorboard/ to its cwd)."""
    try:
        proc = subprocess.run(
            [str(RECBOLE_PY), "-c", RUNNER, json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=cfg["data_path"],
        )
    finally:  # keep the per-epoch log even when RecBole fails or runs out of time
        logs = sorted(Path(cfg["data_path"]).glob("log/SASRec/*.log"))
        if log is not None and logs:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(logs[-1].read_text())
    for line in proc.stdout.splitlines():
        if line.startswith("RECBOLE_RESULT "):
            result: dict[str, Any] = json.loads(line[len("RECBOLE_RESULT ") :])
            return result
    raise RuntimeError(
        f"RecBole failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


_LOG_RESULT = re.compile(r"(best valid|test result)\s*:\s*OrderedDict\((\[.*\])\)")


def parse_recbole_log(text: str) -> dict[str, Any]:
    """`best_valid_result` and `test_result` from a RecBole log (its last run)."""
    out: dict[str, Any] = {}
    for kind, pairs in _LOG_RESULT.findall(text):
        key = "best_valid_result" if kind == "best valid" else "test_result"
        out[key] = {k: float(v) for k, v in ast.literal_eval(pairs)}
        epochs = re.findall(r"epoch (\d+) training", text)
        out["epochs_run"] = int(epochs[-1]) + 1 if epochs else None
    if "test_result" not in out:
        raise ValueError("no 'test result' line in the RecBole log (did the run finish?)")
    return out


def genrec_sasrec(data: Any, **overrides: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """genrec's SASRec as `genrec evaluate` runs it (SASRecConfig defaults, with the `overrides` that are not
    None, e.g. epochs, eval_every, patience): trained on the LS training part
    (minus valid and test, as RecBole's split), its epoch chosen by validation NDCG@10 as RecBole's early
    stopping does, scored on the test users."""
    from dataclasses import asdict, replace

    from genrec.baselines import SASRecConfig, sasrec_lists
    from genrec.data.catalog import leave_one_out
    from genrec.evaluation.metrics import user_metrics

    cfg = replace(SASRecConfig(), **{k: v for k, v in overrides.items() if v is not None})
    examples = leave_one_out(data, "test")
    # split="test" with selection: trains on s[:-2], selects on s[-2], ranks s[-1], like LS valid_and_test
    lists = sasrec_lists(data, examples, split="test", k=max(KS), cfg=cfg)
    per_user = [user_metrics(lst, ex.target, KS) for lst, ex in zip(lists, examples, strict=True)]
    return {k: float(np.mean([u[k] for u in per_user])) for k in per_user[0]}, asdict(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recbole-epochs", type=int, default=20, help="RecBole epochs (early stopping on valid NDCG@10)."
    )
    p.add_argument(
        "--genrec-epochs",
        type=int,
        default=None,
        help="genrec SASRec epochs (default: SASRecConfig's). One RecBole epoch visits every prefix of "
        "every sequence (~100x the updates of one genrec epoch, which trains all positions at once).",
    )
    p.add_argument(
        "--from-recbole-log",
        type=Path,
        default=None,
        help="Take RecBole's result from the log of an earlier run instead of training it again.",
    )
    p.add_argument(
        "--genrec-eval-every",
        type=int,
        default=None,
        help="genrec SASRec: epochs between validation rankings (default: SASRecConfig's, 5; RecBole: 1).",
    )
    p.add_argument(
        "--genrec-patience",
        type=int,
        default=None,
        help="genrec SASRec: validation rankings without a better NDCG@10 before it stops (default: "
        "SASRecConfig's, 10). With --genrec-eval-every 1 and 10, the stopping rule RecBole uses.",
    )
    p.add_argument(
        "--genrec-result",
        type=Path,
        default=None,
        help="Take genrec's side from an earlier run's output JSON (its 'genrec' entry) instead of training it "
        "again (ml-100k: up to 500 epochs, ~18 min on the 2-core CPU).",
    )
    p.add_argument(
        "--stopping-step",
        type=int,
        default=10,
        help="RecBole stops after this many evaluations without a better valid NDCG@10 (RecBole's default: 10).",
    )
    p.add_argument(
        "--eval-step", type=int, default=1, help="RecBole evaluates on valid every this many epochs."
    )
    p.add_argument("--lr", type=float, default=1e-3, help="RecBole learning rate.")
    p.add_argument("--batch-size", type=int, default=512, help="RecBole batch size (prefixes).")
    p.add_argument("--timeout", type=int, default=6 * 3600, help="Seconds RecBole may run.")
    p.add_argument("--out", default="bench/results/recbole_peer.json")
    args = p.parse_args(argv)
    if not (SHARED / "ml-100k").is_dir():
        print(f"skipped: {SHARED / 'ml-100k'} is absent")
        return 0
    if not RECBOLE_PY.exists():
        print(f"skipped: {RECBOLE_PY} is absent; run `bash bench/recbole_setup.sh` first")
        return 0
    from genrec.config import load_config
    from genrec.data import load_dataset

    cfg = load_config(ROOT / "genrec/recipes/ml-100k.yaml")
    cfg.data.path = str(SHARED / "ml-100k")
    data = load_dataset(cfg.data)
    sizes = {**SIZES, "batch_size": args.batch_size, "lr": args.lr}
    results: dict[str, Any] = {
        "dataset": "ml-100k",
        "users": len(data),
        "items": len(data.catalog),
        "sizes": sizes,
    }
    if args.from_recbole_log is not None:
        results["recbole"] = {
            "log": str(args.from_recbole_log),
            **parse_recbole_log(args.from_recbole_log.read_text()),
        }
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            export_atomic(data, folder, "ml100k_genrec")
            started = time.time()
            rb = run_recbole(
                recbole_config(
                    folder,
                    "ml100k_genrec",
                    epochs=args.recbole_epochs,
                    sizes=sizes,
                    eval_step=args.eval_step,
                    stopping_step=args.stopping_step,
                ),
                args.timeout,
                log=Path(args.out).with_suffix(".recbole.log"),
            )
            results["recbole"] = {
                "epochs": args.recbole_epochs,
                "stopping_step": args.stopping_step,
                "seconds": round(time.time() - started, 1),
                **rb,
            }
    if args.genrec_result is not None:
        results["genrec"] = {
            **json.loads(args.genrec_result.read_text())["genrec"],
            "from": str(args.genrec_result),
        }
    else:
        started = time.time()
        ours_result, ours_cfg = genrec_sasrec(
            data, epochs=args.genrec_epochs, eval_every=args.genrec_eval_every, patience=args.genrec_patience
        )
        results["genrec"] = {
            "config": ours_cfg,
            "seconds": round(time.time() - started, 1),
            "test_result": ours_result,
        }
    ours = results["genrec"]["test_result"]
    rb_test = {k.lower(): v for k, v in results["recbole"]["test_result"].items()}
    results["ndcg@10_ratio"] = ours["ndcg@10"] / rb_test["ndcg@10"] if rb_test.get("ndcg@10") else None
    save(args.out, results)
    print("\n| | recall@10 | ndcg@10 | recall@20 | ndcg@20 | mrr |\n|---|---|---|---|---|---|")
    for name, m in (("RecBole 1.2.1 SASRec (CE)", rb_test), ("genrec SASRec (CE)", ours)):
        print(
            f"| {name} | "
            + " | ".join(
                f"{m.get(k, float('nan')):.4f}"
                for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr")
            )
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
