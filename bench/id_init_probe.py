"""Probe: what makes a from-scratch Qwen2 over atomic item tokens learn, in minutes on the CPU.

Not genrec's training path (that is TRL, `genrec train`): a bare PyTorch loop over a prepared run's
interactions and item embeddings, to try ideas before building them into genrec. `--fmt` mimics
genrec's prompt layout (12 prefix tokens, a separator after each item, 8 suffix tokens before the
answer, like ids_only + the chat template). It ranks the whole catalogue minus seen items by the
next-token logits (exact for atomic IDs), chronological leave-one-out, and reports the test metrics of
the best validation epoch.

    python -m bench.id_init_probe --run runs/sci-atomic --fmt --epochs 8                  # random ID rows
    python -m bench.id_init_probe --run runs/sci-atomic --fmt --content-init --emb-scale 6 --hist-loss
    python -m bench.id_init_probe --run runs/sci-atomic --all-pos --epochs 40             # SASRec-like

`--content-init` is what `model.id_init=items` does for atomic IDs; `--hist-loss` also puts loss on
every history item (genrec's `train.history_loss`); `--all-pos` drops the prompt layout altogether.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from genrec.data import Interactions, leave_one_out
from genrec.evaluation.metrics import user_metrics
from genrec.run import RunDir

PAD, START, SEP = 0, 1, 14
PREFIX = list(range(2, 14))  # system prompt + "History:"
OFFSET = 40  # item i is token OFFSET + i


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--run", required=True, help="a prepared run with atomic or any IDs (only its data is used)"
    )
    p.add_argument("--fmt", action="store_true", help="genrec's prompt layout around the history")
    p.add_argument("--suffix", type=int, default=8, help="--fmt: tokens between the last item and the answer")
    p.add_argument("--hist-loss", action="store_true", help="loss on every history item, not only the answer")
    p.add_argument("--all-pos", action="store_true", help="no prompt layout: loss at every position")
    p.add_argument("--content-init", action="store_true", help="item rows from the run's item embeddings")
    p.add_argument("--emb-scale", type=float, default=1.0, help="their spread, in units of the init std")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--maxlen", type=int, default=20, help="history items shown")
    return p.parse_args(argv)


def prompt(hist: list[int], a: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Tokens whose last position predicts the next item, and the positions of the history items."""
    if not a.fmt:
        return [START, *hist], list(range(1, len(hist) + 1))
    toks, at = list(PREFIX), []
    for x in hist:
        at.append(len(toks))
        toks += [x, SEP]
    return toks + list(range(15, 15 + a.suffix)), at


def training_rows(seqs: list[list[int]], a: argparse.Namespace) -> list[tuple[list[int], list[int]]]:
    """(tokens, positions that carry loss) per training row; targets come from the training part only."""
    rows = []
    for s in seqs:
        s = [x + OFFSET for x in s[:-2]]
        if (
            a.hist_loss or a.all_pos
        ):  # one row per window of maxlen + 1 items, loss on every item after the first
            for end in range(len(s), 1, -a.maxlen):
                seg = s[max(0, end - a.maxlen - 1) : end]
                toks, at = prompt(seg[:-1], a)
                rows.append(([*toks, seg[-1]], [*at[1:], len(toks)]))
        else:  # one row per target, like genrec's examples_per_user=0
            for t in range(1, len(s)):
                toks, _ = prompt(s[max(0, t - a.maxlen) : t], a)
                rows.append(([*toks, s[t]], [len(toks)]))
    return rows


def build_model(a: argparse.Namespace, n_items: int, run: str) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=OFFSET + n_items, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    if a.content_init:
        from genrec.ids import atomic_ids
        from genrec.modeling import id_token_vectors

        vectors = id_token_vectors(atomic_ids(n_items), np.load(f"{run}/item_embeddings.npy"), a.hidden)
        mat = torch.from_numpy(np.stack([vectors[f"<item_{i}>"] for i in range(n_items)]))
        with torch.no_grad():
            model.model.embed_tokens.weight[OFFSET:] = mat / mat.std() * cfg.initializer_range * a.emb_scale
    return model


def batch_of(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask, position ids and labels (-100 off the loss positions)."""
    width = max(len(toks) for toks, _ in rows)
    ids = torch.full((len(rows), width), PAD)
    att = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for k, (toks, loss_at) in enumerate(rows):
        pad = width - len(toks)
        ids[k, pad:], att[k, pad:] = torch.tensor(toks), 1
        for t in loss_at:
            labels[k, pad + t] = toks[t]
    return ids, att, (att.cumsum(1) - 1).clamp(min=0), labels


def rank_metrics(model: Any, data: Interactions, split: str, a: argparse.Namespace) -> tuple[float, float]:
    """Recall@10 and NDCG@10 over genrec's own split and metrics: full ranking minus the user's items."""
    examples = leave_one_out(data, split)
    totals = {"recall@10": 0.0, "ndcg@10": 0.0}
    model.eval()
    with torch.no_grad():
        for i in tqdm(range(0, len(examples), 256), desc=f"ranking {split}", unit="batch", leave=False):
            chunk = examples[i : i + 256]
            prompts = [prompt([x + OFFSET for x in ex.history[-a.maxlen :]], a)[0] for ex in chunk]
            ids, att, pos, _ = batch_of([(p, []) for p in prompts])
            logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -1, OFFSET:]
            for k, ex in enumerate(chunk):
                scores = logits[k].clone()
                scores[list(ex.history)] = -torch.inf
                ranked = scores.topk(10).indices.tolist()
                for name, value in user_metrics(ranked, ex.target, [10]).items():
                    if name in totals:
                        totals[name] += value
    model.train()
    return totals["recall@10"] / len(examples), totals["ndcg@10"] / len(examples)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    np.random.seed(0)  # batch order; the model is seeded in build_model
    data = RunDir(Path(a.run)).load_data()
    seqs = [list(s) for s in data.sequences]
    rows = training_rows(seqs, a)
    print(f"{len(rows)} rows, {sum(len(r[1]) for r in rows)} loss positions", flush=True)
    model = build_model(a, len(data.catalog), a.run)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    total = math.ceil(len(rows) / a.batch) * a.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / (0.05 * total)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))),
    )
    best: dict[str, Any] = {"valid_ndcg10": -1.0}
    started = time.time()
    for epoch in range(1, a.epochs + 1):
        losses = []
        batches = np.array_split(np.random.permutation(len(rows)), math.ceil(len(rows) / a.batch))
        for i in tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False):
            ids, att, pos, labels = batch_of([rows[j] for j in i])
            loss = model(input_ids=ids, attention_mask=att, position_ids=pos, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        r, n = rank_metrics(model, data, "valid", a)
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}, valid R@10 {r:.4f} N@10 {n:.4f}", flush=True)
        if n > best["valid_ndcg10"]:
            test = rank_metrics(model, data, "test", a)
            best = {"epoch": epoch, "valid_ndcg10": n, "test_recall10": test[0], "test_ndcg10": test[1]}
    result = {"args": vars(a), "best": best, "seconds": round(time.time() - started, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
