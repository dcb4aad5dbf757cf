"""Helpers shared by the benchmarks: machine description, percentiles, results files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores, torch {torch.__version__}"


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def save(path: str | None, payload: dict[str, Any]) -> None:
    payload = {"machine": machine(), "commit": git_rev(), **payload}
    print(json.dumps(payload, indent=2))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))


def batch_job_parser(doc: str | None) -> argparse.ArgumentParser:
    """Options of the benchmarks that time one process of a batch job per user (bench.ranking_host,
    bench.prep_worker): the run, and batches as `genrec generate` makes them."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--users", type=int, default=1024)
    p.add_argument(
        "--batch", type=int, default=256, help="users per batch, as `genrec generate --batch-size`"
    )
    p.add_argument("--n-candidates", type=int, default=200, help="retrieved candidates per user")
    p.add_argument("--k", type=int, default=10, help="items per user")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per step; the best counts")
    p.add_argument("--out", default=None)
    return p


def best_of(repeats: int, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """The fastest wall time of `repeats` calls of fn(*args), in seconds, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def best_ms_per_user(fn: Callable[[], Any], users: int, repeats: int) -> float:
    """Milliseconds per user of the fastest of `repeats` calls of `fn` (each handling `users` users)."""
    return round(best_of(repeats, fn)[0] / users * 1000, 4)


def paired_runs(run: Path, base: Path, *, stem: str = "test", method: str = "genrec") -> dict[str, Any]:
    """`method`'s figures in `run` minus those in `base`, user by user, from the per-user files `genrec evaluate`
    wrote (eval_<stem>_users.parquet: `test`, `test_need`, `test_cold`...), with 95% intervals: the eval report's
    paired comparison, between two runs evaluated on the same split and users (a mismatch is an error)."""
    import pandas as pd

    from genrec.evaluation import paired_differences

    metrics = ["recall@10", "ndcg@10", "mrr"]
    frames = {}
    for name, path in (("run", run), ("base", base)):
        df = pd.read_parquet(Path(path) / f"eval_{stem}_users.parquet")
        frames[name] = df[df["method"] == method].sort_values("user")
    users = [list(f["user"]) for f in frames.values()]
    if users[0] != users[1]:
        raise ValueError(f"eval_{stem}: {run} and {base} were evaluated on different users")
    per_user = {name: f[metrics].to_dict("records") for name, f in frames.items()}
    return {
        "users": len(users[0]),
        **{name: {m: float(f[m].mean()) for m in metrics} for name, f in frames.items()},
        "run_minus_base": paired_differences(per_user, metrics, reference="run")["base"],
    }
