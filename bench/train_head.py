"""Seconds per training step with TRL's fused LM head, genrec's labelled-positions head, and the same head
with each restricted softmax (model.id_softmax ids and level).

On a device without Triton (the CPU) TRL's fused head projects every position of a batch through the
whole vocabulary; `genrec.training.labelled_positions_head` projects the labelled ones only, and with a
restricted softmax only onto their group's rows (every ID token, or the level's). This times them on a
prepared run's own initial model (base/, built as `genrec train` builds it if it is not there yet) and its
own training rows (`train.history_loss` windows), batch by batch: forward, backward and an AdamW step,
after one warm-up step each. The first two compute the same loss; a restricted softmax's is another
quantity (a softmax over fewer tokens), so only its time compares.

    python -m bench.train_head --run runs/bin1 --steps 5 --out bench/results/cpu_train_head_bin1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from genrec.config import RunConfig
from genrec.data import Interactions, history_windows
from genrec.id_softmax import group_softmax, softmax_groups
from genrec.run import RunDir
from genrec.templates.prompts import PromptBuilder
from genrec.training import history_loss_rows, labelled_positions_head, prepare_model, prompt_builder


def batches(
    cfg: RunConfig, data: Interactions, builder: PromptBuilder, tokenizer: Any, n: int, size: int
) -> list[dict[str, torch.Tensor]]:
    """`n` padded batches of the run's history-loss rows, in order (the first windows of the data)."""
    windows = history_windows(data, window=cfg.prompt.max_history, per_user=cfg.train.examples_per_user)
    rows, _ = history_loss_rows(builder, tokenizer, windows[: n * size])
    out = []
    for b in range(n):
        chunk = rows[b * size : (b + 1) * size]
        width = max(len(r["input_ids"]) for r in chunk)
        pad = tokenizer.pad_token_id
        ids_ = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in chunk])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk])
        out.append({"input_ids": ids_, "attention_mask": mask, "labels": labels})
    return out


def time_steps(model: Any, data: list[dict[str, torch.Tensor]]) -> tuple[list[float], list[float]]:
    """Seconds per step (warm-up step excluded) and each step's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seconds, losses = [], []
    for k, batch in enumerate([data[0], *data]):
        start = time.perf_counter()
        loss = model(**batch, fused_lm_head=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if k:
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
    return seconds, losses


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from trl.trainer.utils import add_fused_lm_head

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a prepared run with IDs built")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: train.batch_size)")
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    run = RunDir(args.run)
    cfg = run.load_config()
    torch.manual_seed(0)
    interactions = run.load_data()
    builder = prompt_builder(run, cfg, interactions, run.load_ids())
    trl_model, tokenizer = prepare_model(run, cfg, builder, interactions, resume=True)  # base/ if there
    size = args.batch or cfg.train.batch_size
    data = batches(cfg, interactions, builder, tokenizer, args.steps, size)
    heads = {"trl_fused_head": trl_model, "labelled_positions_head": copy.deepcopy(trl_model)}
    heads |= {f"id_softmax_{mode}": copy.deepcopy(trl_model) for mode in ("ids", "level")}
    for name, m in heads.items():
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
        if name != "trl_fused_head":  # genrec's head, with the vocabulary softmax or a restricted one
            mode = name.removeprefix("id_softmax_") if name.startswith("id_softmax_") else "full"
            labelled_positions_head(
                m, group_softmax(softmax_groups(builder.ids.level_tokens(), mode), tokenizer)
            )
    result: dict[str, Any] = {
        "run": str(args.run),
        "vocabulary": int(trl_model.config.vocab_size),
        "batch": size,
        "positions_per_step": float(sum(int(b["attention_mask"].sum()) for b in data) / len(data)),
        "labelled_per_step": float(sum(int((b["labels"] != -100).sum()) for b in data) / len(data)),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    for name, model in heads.items():
        seconds, losses = time_steps(model, data)
        result[name] = {"seconds_per_step": sum(seconds) / len(seconds), "steps": seconds, "losses": losses}
        print(f"{name}: {result[name]['seconds_per_step']:.2f} s/step (losses {losses})")
    per_step = {name: result[name]["seconds_per_step"] for name in heads}
    result["speedup"] = per_step["trl_fused_head"] / per_step["labelled_positions_head"]
    for mode in ("ids", "level"):  # over the labelled-positions head with the vocabulary softmax
        result[f"id_softmax_{mode}_speedup"] = (
            per_step["labelled_positions_head"] / per_step[f"id_softmax_{mode}"]
        )
    print(
        f"speed-up {result['speedup']:.1f}x; restricted softmax over the labelled-positions head: ids "
        f"{result['id_softmax_ids_speedup']:.1f}x, level {result['id_softmax_level_speedup']:.1f}x"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
