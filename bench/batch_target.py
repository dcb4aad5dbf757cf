"""Issue 4's GPU batch target from a `bench/gpu_suite.sh` results folder: the batch job's users/s (exact tree
scoring of 200 retrieved candidates, `--prep-workers N`: `engine_hf_retriever_exact_prep<N>.json`) over vLLM's
greedy engine alone on the same machine (`engine_vllm.json`, pre-tokenized prompts, 4 new tokens). Target: >= 0.6.
Also the two other denominators BENCHMARKS.md reports: vLLM's greedy job rendering its prompts in-process, and a
greedy job given the same preparation workers (transformers `generate`).

python -m bench.batch_target $OUT     # after PARTS="hf-prep vllm"; prints a table, writes $OUT/batch_target.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

TARGET = 0.6


def batch_target(folder: Path) -> dict[str, Any]:
    """Each preparation-worker count's users/s and its ratios; an error naming the file that is missing."""
    vllm_file = folder / "engine_vllm.json"
    if not vllm_file.is_file():
        raise SystemExit(f"{vllm_file} is missing: run the suite's `vllm` part on the same machine")
    vllm = json.loads(vllm_file.read_text())
    greedy, greedy_prompts = vllm["greedy_users_per_s"], vllm["greedy_with_prompts_users_per_s"]
    rows = []
    for f in sorted(folder.glob("engine_hf_retriever_exact_prep*.json")):
        r = json.loads(f.read_text())
        workers = int(re.search(r"prep(\d+)", f.stem)[1])  # type: ignore[index]
        users_s = r["constrained_users_per_s_prep_workers"]
        rows.append(
            {
                "prep_workers": workers,
                "users_per_s": users_s,
                "vs_vllm_greedy_engine": round(users_s / greedy, 3),
                "vs_vllm_greedy_rendering_prompts": round(users_s / greedy_prompts, 3),
                "vs_greedy_same_workers": r.get("constrained_vs_greedy_with_prompts_prep_workers"),
                "commit": r.get("commit"),
            }
        )
    if not rows:
        raise SystemExit(
            f"no engine_hf_retriever_exact_prep*.json in {folder}: run the suite's `hf-prep` part"
        )
    rows.sort(key=lambda r: r["prep_workers"])
    best = max(rows, key=lambda r: r["users_per_s"])
    return {
        "machine": vllm.get("machine"),
        "vllm_greedy_users_per_s": greedy,
        "vllm_greedy_with_prompts_users_per_s": greedy_prompts,
        "rows": rows,
        "best_ratio": best["vs_vllm_greedy_engine"],
        "target": TARGET,
        "met": best["vs_vllm_greedy_engine"] >= TARGET,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="the suite's results folder ($OUT)")
    args = p.parse_args()
    out = batch_target(args.folder)
    print(
        f"{out['machine']}: vLLM greedy {out['vllm_greedy_users_per_s']:,} users/s (engine alone), "
        f"{out['vllm_greedy_with_prompts_users_per_s']:,} (rendering its prompts)"
    )
    print(
        "| prep workers | users/s | vs greedy engine | vs greedy rendering prompts | vs greedy, same workers |"
    )
    print("|---|---|---|---|---|")
    for r in out["rows"]:
        print(
            f"| {r['prep_workers']} | {r['users_per_s']:,} | {r['vs_vllm_greedy_engine']} | "
            f"{r['vs_vllm_greedy_rendering_prompts']} | {r['vs_greedy_same_workers']} |"
        )
    print(
        f"target >= {TARGET} of the greedy engine: {'met' if out['met'] else 'not met'} ({out['best_ratio']})"
    )
    (args.folder / "batch_target.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
