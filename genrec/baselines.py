"""Baselines scored on the same split as genrec: popularity, item-kNN, a Markov chain over the last items,
the retriever alone, SASRec (CE).

Each baseline sees only what the model saw: interactions before the split's targets (for `test`,
every item but each user's last; for `valid`, all but the last two). Each returns, per example,
the top-k items over the whole catalogue minus the user's history (full ranking).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from genrec.data import Example, Interactions
from genrec.topk import top_k_rows

logger = logging.getLogger(__name__)


def visible_sequences(data: Interactions, split: str) -> list[list[int]]:
    cut = 1 if split == "test" else 2
    return [s[:-cut] for s in data.sequences]


def _top_k_unseen(scores: np.ndarray, history: Sequence[int], k: int) -> list[int]:
    scores = scores.astype(np.float64, copy=True)
    scores[list(history)] = -np.inf
    top, vals = top_k_rows(scores[None, :], k)
    return [int(i) for i, v in zip(top[0], vals[0], strict=True) if np.isfinite(v)]


def itemknn_lists(
    data: Interactions,
    examples: Sequence[Example],
    *,
    split: str,
    k: int,
    neighbours: int = 100,
    shrink: float = 10.0,
) -> list[list[int]]:
    """Item-based kNN: cosine similarity of item columns of the user-item matrix, top neighbours kept; a user's
    score for an item sums its similarities to the history's items."""
    sim = itemknn_similarity(data, split=split, neighbours=neighbours, shrink=shrink)
    return [_top_k_unseen(itemknn_scores(sim, [ex.history])[0], ex.history, k) for ex in examples]


def itemknn_similarity(data: Interactions, *, split: str, neighbours: int = 100, shrink: float = 10.0) -> Any:
    """Item-kNN's model: the [n_items, n_items] sparse item-item cosine similarity (shrunk by `shrink`) of the
    user-item matrix of the sequences visible before `split`'s targets, each item row keeping its top
    `neighbours` similarities."""
    from scipy import sparse

    seqs = visible_sequences(data, split)
    n = len(data.catalog)
    rows = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    x = sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(seqs), n))
    x.data[:] = 1.0
    co = (x.T @ x).tocsr().astype(np.float32)
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    co = co.tocoo()
    sim = co.data / (norms[co.row] * norms[co.col] + shrink)
    sim[co.row == co.col] = 0.0
    s = sparse.csr_matrix((sim, (co.row, co.col)), shape=(n, n))
    # keep the top `neighbours` similarities per item row
    kept_rows, kept_cols, kept_vals = [], [], []
    for i in range(n):
        start, end = s.indptr[i], s.indptr[i + 1]
        vals, idx = s.data[start:end], s.indices[start:end]
        if len(vals) > neighbours:
            sel = np.argpartition(-vals, neighbours)[:neighbours]
            vals, idx = vals[sel], idx[sel]
        kept_rows.append(np.full(len(idx), i))
        kept_cols.append(idx)
        kept_vals.append(vals)
    return sparse.csr_matrix(
        (np.concatenate(kept_vals), (np.concatenate(kept_rows), np.concatenate(kept_cols))), shape=(n, n)
    )


def itemknn_scores(sim: Any, histories: Sequence[Sequence[int]]) -> np.ndarray:
    """[len(histories), n_items] item-kNN scores: per history, the sum of its items' similarity rows (an item
    seen twice counts twice)."""
    out = np.zeros((len(histories), sim.shape[1]), dtype=np.float32)
    for r, h in enumerate(histories):
        out[r] = np.asarray(sim[list(h)].sum(axis=0)).ravel()
    return out


def markov_lists(
    data: Interactions,
    examples: Sequence[Example],
    *,
    split: str,
    k: int,
    last: int = 3,
    decay: float = 0.5,
) -> list[list[int]]:
    """A first-order Markov chain: P(next | item) from the consecutive pairs of the visible sequences; a user's
    score for an item is the sum over their `last` items of decay^age * P(item | that item), the most recent
    at age 0. Popularity breaks ties and fills the list where transitions run out, so every list is full.
    The simplest sequential baseline: where it is strong, what comes next depends on the last few items."""
    trans, tie = markov_transitions(data, split=split)
    out: list[list[int]] = []
    for s in range(0, len(examples), 512):  # dense score rows, a batch at a time
        batch = examples[s : s + 512]
        scores = markov_scores(trans, tie, [ex.history for ex in batch], last=last, decay=decay)
        out.extend(_top_k_unseen(row, ex.history, k) for row, ex in zip(scores, batch, strict=True))
    return out


def markov_transitions(data: Interactions, *, split: str) -> tuple[Any, np.ndarray]:
    """The Markov chain's model: P(next | item) as a sparse row-stochastic matrix from the consecutive pairs of the
    sequences visible before `split`'s targets, and the popularity tie-breaker (below any transition's weight)."""
    from scipy import sparse

    visible = visible_sequences(data, split)
    seqs = [s for s in visible if len(s) >= 2]
    n = len(data.catalog)
    src = np.concatenate([np.asarray(s[:-1], dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, int)
    dst = np.concatenate([np.asarray(s[1:], dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, int)
    counts = sparse.csr_matrix((np.ones(len(src), dtype=np.float64), (src, dst)), shape=(n, n))
    out_degree = np.asarray(counts.sum(axis=1)).ravel()
    trans = (sparse.diags(1.0 / np.maximum(out_degree, 1.0)) @ counts).tocsr()  # rows: P(next | item)
    pop = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in visible]), minlength=n)
    return trans, 1e-9 * pop / max(int(pop.max()), 1)


def markov_scores(
    trans: Any, tie: np.ndarray, histories: Sequence[Sequence[int]], *, last: int = 3, decay: float = 0.5
) -> np.ndarray:
    """[len(histories), n_items] Markov-chain scores: per history, the sum over its `last` items of
    decay^age * P(item | that item), the most recent at age 0, plus the popularity tie-breaker."""
    from scipy import sparse

    n = trans.shape[0]
    rows, cols, vals = [], [], []
    for r, history in enumerate(histories):
        recent = list(history[-last:])[::-1]
        rows += [r] * len(recent)
        cols += recent
        vals += list(decay ** np.arange(len(recent)))
    weights = sparse.csr_matrix((vals, (rows, cols)), shape=(len(histories), n))
    return np.asarray((weights @ trans).todense()) + tie


def retriever_lists(retriever: object, examples: Sequence[Example], *, k: int) -> list[list[int]]:
    """The embedding retriever alone (recency-weighted history embedding, inner product), no LM."""
    return retriever.for_histories([ex.history for ex in examples], k)  # type: ignore[attr-defined]


@dataclass
class SASRecConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50
    epochs: int = 100
    """Training epochs at most."""
    batch_size: int = 128
    lr: float = 3e-3  # on the demo data, 100 epochs: lr 3e-3 -> R@10 0.642, lr 1e-3 -> 0.478
    seed: int = 0
    eval_every: int = 5
    """Epochs between validation rankings (with `patience`)."""
    patience: int = 10
    """Validation rankings without a better NDCG@10 before training stops; the best epoch's weights rank the
    split. 0: no selection, train `epochs` on every visible item (the last one included). 50 epochs: with 4
    (20 epochs) one ml-100k seed stopped on an early plateau at epoch 75 (validation NDCG@10 0.036; the
    other seeds went on to 0.10 after 300+ epochs)."""
    valid_users: int = 5000
    """Users whose held-out item is ranked at each validation (the first N; 0: all)."""


class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang & McAuley 2018) trained with full-softmax CE."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)  # 0 = padding, item i -> i + 1
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden,
            cfg.heads,
            cfg.hidden * 4,
            cfg.dropout,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, L] item ids (+1, left-padded with 0) -> [B, L, n_items] logits over the next item."""
        return self.scores(self.encode(seq))

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] final states -> [..., n_items] logits over the next item (the item embeddings, tied)."""
        return hidden @ self.items.weight[1:].T

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, L] item ids (+1, left-padded with 0) -> [B, L, hidden] final states."""
        length = seq.shape[1]
        h = self.items(seq) * math.sqrt(self.cfg.hidden) + self.pos(torch.arange(length, device=seq.device))
        # As in SASRec, padding positions are zeroed instead of masked as keys: a key-padding mask leaves
        # the left-padded rows with nothing to attend to, whose NaNs then poison the gradients.
        h = self.drop(h) * (seq != 0).unsqueeze(-1)
        causal = torch.triu(torch.full((length, length), float("-inf"), device=seq.device), diagonal=1)
        return self.norm(self.encoder(h, mask=causal, is_causal=False))


def sasrec_loss(model: SASRec, seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next item over the catalogue at every position that has one (`target` >= 0;
    -1: padding). Logits are made only there: on the demo data 40% of the positions are padding, and the
    catalogue-wide head and its softmax were half of an epoch's time."""
    keep = target >= 0
    return nn.functional.cross_entropy(model.scores(model.encode(seq)[keep]), target[keep])


def _left_pad(seqs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    out = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = [x + 1 for x in s[-length:]]
        if s:
            out[i, length - len(s) :] = torch.tensor(s)
    return out


def sasrec_lists(
    data: Interactions,
    examples: Sequence[Example],
    *,
    split: str,
    k: int,
    cfg: SASRecConfig | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    trained: tuple[SASRec, int] | None = None,
) -> list[list[int]]:
    """Train SASRec on the sequences visible before the split's targets (`fit_sasrec`), then rank for each
    example: the top k over the whole catalogue minus its history. `trained`: an already trained (model, window)
    (`fit_sasrec`'s) ranks instead."""
    model, window = trained or fit_sasrec(
        data,
        split=split,
        cfg=cfg,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_key=checkpoint_key,
        windows=[ex.history for ex in examples],
    )
    return _rank(model, examples, k, window, next(model.parameters()).device)


def fit_sasrec(
    data: Interactions,
    *,
    split: str,
    cfg: SASRecConfig | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    windows: Sequence[Sequence[int]] = (),
) -> tuple[SASRec, int]:
    """SASRec trained on the sequences visible before the split's targets, and the window (columns) it reads.

    With `cfg.patience` > 0 the epoch is chosen as genrec's own is (train.select_metric): each user's last
    visible item (for the test split, the validation item) is held out of training, ranked every
    `eval_every` epochs by NDCG@10 over the full catalogue minus the user's items, and the best epoch's
    weights are kept. That is RecBole's protocol (train on all but the last two items, select on
    the second-last, test on the last); without it the last epoch's weights are used, however they rank.
    `windows`: histories the model will read besides its own data (the window covers the longest).

    `checkpoint`: a file where the training state (weights, optimizer, best epoch, random generators) is kept
    after every epoch; a call that finds one with the same `checkpoint_key` goes on from it, and ends with the
    model an uninterrupted call gives."""
    from genrec.evaluation.metrics import user_metrics  # the metric genrec evaluate reports

    cfg = cfg or SASRecConfig()
    torch.manual_seed(cfg.seed)
    visible = [s for s in visible_sequences(data, split) if len(s) >= 2]
    held: list[Example] = []
    if cfg.patience > 0:
        held = [Example("", tuple(s[:-1]), s[-1]) for s in visible]
        held = held[: cfg.valid_users] if cfg.valid_users > 0 else held
        visible = [s[:-1] for s in visible if len(s) >= 3]
    train = [s[:-1] for s in visible]  # inputs; targets shifted by one
    targets = [s[1:] for s in visible]
    window = sasrec_window(cfg.max_len, train, [ex.history for ex in held], windows)
    x, y = _left_pad(train, window), _left_pad(targets, window) - 1  # y: -1 = padding
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = SASRec(len(data.catalog), cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (-1.0, 0, None)
    epoch, finished = 0, False
    if checkpoint is not None:
        state = _load_sasrec_state(checkpoint, checkpoint_key)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            best, epoch, finished = state["best"], state["epoch"], state["finished"]
            torch.set_rng_state(state["rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            logger.info("SASRec: going on after epoch %d (%s)", epoch, checkpoint)
    bar = tqdm(total=cfg.epochs, initial=epoch, desc="SASRec", unit="epoch", disable=not progress or finished)
    while not finished and epoch < cfg.epochs:
        epoch += 1
        model.train()
        perm = torch.randperm(len(x))
        total = 0.0
        for s in range(0, len(x), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            loss = sasrec_loss(model, x[idx].to(device), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        bar.update(1)
        bar.set_postfix(loss=f"{total / len(x):.3f}", best_ndcg=f"{best[0]:.4f}", best_epoch=best[1])
        if held and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            ndcg = float(
                np.mean(
                    [
                        user_metrics(lst, ex.target, [10])["ndcg@10"]
                        for lst, ex in zip(_rank(model, held, 10, window, device), held, strict=True)
                    ]
                )
            )
            if ndcg > best[0]:
                best = (ndcg, epoch, {n: t.detach().clone() for n, t in model.state_dict().items()})
            elif epoch - best[1] >= cfg.patience * cfg.eval_every:
                finished = True
        finished = finished or epoch >= cfg.epochs
        if checkpoint is not None:
            _save_sasrec_state(checkpoint, checkpoint_key, model, opt, best, epoch, finished)
    bar.close()
    if best[2] is not None:
        model.load_state_dict(best[2])
        logger.info("SASRec: best validation NDCG@10 %.4f at epoch %d of %d", best[0], best[1], epoch)
    return model, window


def _save_sasrec_state(
    path: Path,
    key: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    best: tuple[float, int, dict[str, torch.Tensor] | None],
    epoch: int,
    finished: bool,
) -> None:
    """SASRec's training state after `epoch`, written to a temporary file and renamed (a crash leaves the
    previous epoch's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "key": key,
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "best": best,
            "epoch": epoch,
            "finished": finished,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        tmp,
    )
    os.replace(tmp, path)


def _load_sasrec_state(path: Path, key: str) -> dict[str, Any] | None:
    """A kept training state made with `key`, else None (the log says why one is not used)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("key") != key:
        logger.warning("%s: SASRec state of another evaluation (other data or settings); trained again", path)
        return None
    return dict(state)


def sasrec_window(max_len: int, *seqs: Sequence[Sequence[int]]) -> int:
    """Columns SASRec's batches are padded to: `max_len`, or the longest sequence it will see if that is
    shorter. Left-padding columns that no sequence reaches cost compute in every layer and change nothing
    but the padding keys every position also attends to (a model with `max_len` set to the longest
    sequence); on the demo data (at most 30 items) that is 40% of the columns."""
    longest = max((len(s) for group in seqs for s in group), default=1)
    return max(1, min(max_len, longest))


def _rank(
    model: SASRec, examples: Sequence[Example], k: int, max_len: int, device: torch.device
) -> list[list[int]]:
    """Top k over the whole catalogue minus each example's history, from the last position's logits."""
    out: list[list[int]] = []
    for s in range(0, len(examples), 256):
        batch = examples[s : s + 256]
        scores = sasrec_scores(model, [ex.history for ex in batch], max_len, device)
        out.extend(_top_k_unseen(sc, ex.history, k) for sc, ex in zip(scores, batch, strict=True))
    return out


def sasrec_scores(
    model: SASRec, histories: Sequence[Sequence[int]], window: int, device: torch.device | None = None
) -> np.ndarray:
    """[len(histories), n_items] SASRec's logits of the next item after each history (its last `window` items)."""
    model.eval()
    device = device or next(model.parameters()).device
    with torch.no_grad():
        seqs = _left_pad(histories, window).to(device)
        return np.asarray(model.scores(model.encode(seqs)[:, -1]).float().cpu().numpy())
