"""Ranking metrics: per-user Recall / NDCG / MRR, validity, list diversity, confidence intervals.

A leaf module (numpy only): the evaluation harness, the baselines' early stopping, training's validation and
the server's validity counter all import it, and it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rank_of(ranked: Sequence[int], target: int) -> int | None:
    """0-based rank of the target in the list, None when absent."""
    for r, item in enumerate(ranked):
        if item == target:
            return r
    return None


def user_metrics(ranked: Sequence[int], target: int, ks: Sequence[int]) -> dict[str, float]:
    r = rank_of(ranked, target)
    out = {}
    for k in ks:
        hit = r is not None and r < k
        out[f"recall@{k}"] = float(hit)
        out[f"ndcg@{k}"] = 1.0 / math.log2(r + 2) if hit and r is not None else 0.0
    out["mrr"] = 1.0 / (r + 1) if r is not None else 0.0
    return out


def validity(ranked: Sequence[int], history: Sequence[int], n_items: int) -> float:
    """Fraction of returned items that are catalogue items, not in the history, and not repeated."""
    if not ranked:
        return 1.0
    seen, good, hist = set(), 0, set(history)
    for i in ranked:
        if 0 <= i < n_items and i not in hist and i not in seen:
            good += 1
        seen.add(i)
    return good / len(ranked)


def ci_half_width(values: np.ndarray | Sequence[float]) -> float:
    """Half the width of the 95% interval of a mean: 1.96 standard errors (nan for fewer than two values)."""
    v = np.asarray(values, dtype=np.float64)
    return 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")


def intra_list_diversity(lists: Sequence[Sequence[int]], embeddings: np.ndarray) -> float:
    """Mean pairwise cosine distance between the items of each list (0 = identical items)."""
    vals = []
    for lst in lists:
        if len(lst) < 2:
            continue
        e = embeddings[list(lst)]
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        n = len(lst)
        vals.append(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))
    return float(np.mean(vals)) if vals else 0.0
