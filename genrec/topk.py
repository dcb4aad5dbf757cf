"""The top-k cut the score-based rankers (baselines, collaborative and text retrievers) make their lists with.

A leaf (numpy only), so the data-layer modules can import it without the evaluation harness.
"""

from __future__ import annotations

import numpy as np


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k highest scores, best first, equal scores in item order (the lower index first): the top n
    is then always the first n of the top N, whatever k. Returns (items, scores), [rows, min(k, columns)].

    Linear time per row (argpartition) except in the rows where the cut falls inside a run of equal scores (a
    Markov chain's or item-kNN's zeros), which are sorted whole so that the lowest indices of the tie are kept."""
    n = scores.shape[1]
    kk = min(k, n)
    if kk <= 0:
        return np.zeros((len(scores), 0), dtype=np.int64), np.zeros((len(scores), 0), dtype=scores.dtype)
    if kk < n:
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        vals = np.take_along_axis(scores, top, axis=1)
        kth = vals.min(axis=1, keepdims=True)
        cut = np.flatnonzero((scores == kth).sum(axis=1) > (vals == kth).sum(axis=1))
        if len(cut):
            top[cut] = np.argsort(-scores[cut], axis=1, kind="stable")[:, :kk]
    else:
        top = np.tile(np.arange(n), (len(scores), 1))
    vals = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -vals), axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)
