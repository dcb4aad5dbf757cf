"""Exact ranking of every item in a trie with one forward pass (tree attention).

Beam search needs one model call per ID level and can miss an item whose first tokens score
poorly. When a request's trie is small (retrieved candidates: a few hundred items), it is cheaper
and exact to feed the whole trie at once: the prompt, then every internal trie node as one token,
each node attending to the prompt and to its own ancestors only, at the position it would have in
its own sequence. The logits at the prompt's last token and at each node give the next-token
distribution under every prefix, so log P(item | prompt) is a sum along the item's path, for every
item, from a single forward (the idea of speculative decoding's tree verification).

This module lays tries out as tensors; the transformers engine runs the forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from genrec.decoding.trie import Trie


@dataclass
class TreeLayout:
    """A trie's nodes in breadth-first order: node 0 is the root, leaves come last.

    Nodes 1..n_inputs are the internal ones fed to the model (input token `tokens[i-1]`); the logits
    that score node i's children are read at slot i, where slot 0 is the prompt's last token.
    """

    token: torch.Tensor
    """(N,) the token leading into each node (root: -1)."""
    parent: torch.Tensor
    """(N,) each node's parent (root: -1)."""
    depth: torch.Tensor
    """(N,) 0 for the root, the ID length for leaves."""
    n_inputs: int
    """Internal non-root nodes: the tree tokens appended to the prompt."""
    items: torch.Tensor
    """(N - first_leaf,) the item of each leaf, in node order."""
    level_starts: list[int]
    """level_starts[d]: the first node of depth d (level_starts[-2]: the first leaf); the last entry is N."""
    pairs: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    """`ancestor_pairs()`, kept once computed (and sent along when pickled)."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as numpy arrays: about 30x faster to load than torch tensors (genrec.prep sends
        layouts from worker processes), rebuilt without copies."""
        arrays = [t.numpy() for t in (self.token, self.parent, self.depth, self.items)]
        pairs = None if self.pairs is None else (self.pairs[0].numpy(), self.pairs[1].numpy())
        return _from_arrays, (arrays, self.n_inputs, list(self.level_starts), pairs)

    @property
    def tokens(self) -> np.ndarray:
        """The input tokens of nodes 1..n_inputs (a numpy view: packing reads it per row)."""
        return self.token.numpy()[1 : 1 + self.n_inputs]

    @property
    def positions(self) -> np.ndarray:
        """Offset of each input node's position after the prompt's last one (its depth - 1)."""
        return self.depth.numpy()[1 : 1 + self.n_inputs] - 1

    def ancestor_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key) input-node indices where node `query` may attend to node `key`: the node itself
        and each of its ancestors below the root (at most ID length - 1 pairs per node)."""
        if self.pairs is None:
            self.pairs = self._ancestor_pairs()
        return self.pairs

    def _ancestor_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        # numpy: a few small arrays per level, where torch ops cost more than the work
        parent = self.parent.numpy()
        node = np.arange(1, 1 + self.n_inputs)
        queries, keys = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        cur = node
        while len(cur):
            queries.append(node - 1)
            keys.append(cur - 1)
            up = parent[cur]
            keep = up >= 1  # stop at the root: the prompt is attended to separately
            node, cur = node[keep], up[keep]
        return torch.from_numpy(np.concatenate(queries)), torch.from_numpy(np.concatenate(keys))

    def item_scores(self, edge_logp: torch.Tensor) -> torch.Tensor:
        """log P(item | prompt) per leaf from edge_logp[i] = log P(token of node i | its parent's prefix)."""
        score = torch.zeros(len(self.token), dtype=torch.float64)
        for d in range(1, len(self.level_starts) - 1):
            lo, hi = self.level_starts[d], self.level_starts[d + 1]
            score[lo:hi] = score[self.parent[lo:hi]] + edge_logp[lo:hi].double()
        return score[self.level_starts[-2] :]


def _from_arrays(
    arrays: list[np.ndarray],
    n_inputs: int,
    level_starts: list[int],
    pairs: tuple[np.ndarray, np.ndarray] | None,
) -> TreeLayout:
    token, parent, depth, items = (torch.from_numpy(a) for a in arrays)
    return TreeLayout(
        token,
        parent,
        depth,
        n_inputs,
        items,
        level_starts,
        None if pairs is None else (torch.from_numpy(pairs[0]), torch.from_numpy(pairs[1])),
    )


def layout(trie: Trie, *, max_inputs: int | None = None) -> TreeLayout | None:
    """Breadth-first layout of a trie of depth >= 1 with at least one item.

    None when it would feed more than `max_inputs` tree tokens. A trie made by `without` (the
    catalogue minus a user's items) is laid out by pruning its base's layout, computed once and
    kept with the base: no walk over the catalogue's nodes per request.
    """
    if trie.depth < 1 or not len(trie):
        raise ValueError("an empty trie has no layout")
    if trie.derived is not None:
        base, removed = trie.derived
        return _layout_without(base, removed, max_inputs=max_inputs)
    assert trie.array is not None, "every trie but a derived one keeps its sequences as an array"
    return _layout_array(*trie.array, max_inputs=max_inputs)


_BASES: weakref.WeakKeyDictionary[Trie, tuple[TreeLayout, dict[tuple[int, ...], int]]] = (
    weakref.WeakKeyDictionary()
)
"""Per base trie (kept while it lives): its full layout and each leaf's node, keyed by the leaf's sequence."""


def _base_layout(base: Trie) -> tuple[TreeLayout, dict[tuple[int, ...], int]]:
    assert base.array is not None
    full = _layout_array(*base.array, max_inputs=None)
    assert full is not None
    starts, depth = full.level_starts, len(full.level_starts) - 2
    leaves = torch.arange(starts[-2], len(full.token))
    seqs = torch.empty((len(leaves), depth), dtype=torch.long)
    node = leaves
    for d in range(depth - 1, -1, -1):  # each leaf's sequence, read back up the parent pointers
        seqs[:, d] = full.token[node]
        node = full.parent[node]
    return full, dict(zip(map(tuple, seqs.tolist()), leaves.tolist(), strict=True))


def _layout_without(
    base: Trie, removed: list[tuple[int, ...]], *, max_inputs: int | None
) -> TreeLayout | None:
    """`base`'s layout minus the leaves of `removed` and the internal nodes left without a leaf."""
    if base not in _BASES:
        _BASES[base] = _base_layout(base)
    full, leaf_of = _BASES[base]
    starts, depth = full.level_starts, len(full.level_starts) - 2
    if max_inputs is not None and full.n_inputs - len(removed) * (depth - 1) > max_inputs:
        return None  # pruning cannot bring it under the limit
    n = len(full.token)
    keep = np.ones(n, dtype=bool)
    gone = [leaf_of[s] for s in removed if s in leaf_of]
    keep[gone] = False
    parent = full.parent.numpy()
    for d in range(depth, 1, -1):  # a node of depth d - 1 stays if one of its children does
        lo, hi = starts[d], starts[d + 1]
        has_child = np.zeros(n, dtype=bool)
        has_child[parent[lo:hi][keep[lo:hi]]] = True
        keep[starts[d - 1] : lo] &= has_child[starts[d - 1] : lo]
    index = np.cumsum(keep) - 1
    new_parent = parent[keep]
    new_parent = np.where(new_parent >= 0, index[np.maximum(new_parent, 0)], -1)
    new_starts = [
        0,
        *np.cumsum([int(keep[starts[d] : starts[d + 1]].sum()) for d in range(depth + 1)]).tolist(),
    ]
    lay = TreeLayout(
        token=full.token[torch.from_numpy(keep)],
        parent=torch.from_numpy(new_parent),
        depth=full.depth[torch.from_numpy(keep)],
        n_inputs=new_starts[-2] - 1,
        items=full.items[torch.from_numpy(keep[starts[-2] :])],
        level_starts=new_starts,
    )
    return None if max_inputs is not None and lay.n_inputs > max_inputs else lay


def _layout_array(tokens: np.ndarray, items: np.ndarray, *, max_inputs: int | None) -> TreeLayout | None:
    """`layout` straight from distinct (n, depth) token rows: each depth's nodes are the distinct
    (parent node, token) pairs, found with one np.unique per depth; no node objects."""
    n, depth = tokens.shape
    token, parent, level = [np.array([-1])], [np.array([-1])], [np.array([0])]
    starts, at = [0], np.zeros(n, dtype=np.int64)  # `at`: each row's node at the current depth
    size = 1
    for d in range(depth):
        key = at * (int(tokens[:, d].max()) + 1) + tokens[:, d]
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        if max_inputs is not None and d < depth - 1 and size - 1 + len(first) > max_inputs:
            return None
        starts.append(size)
        token.append(tokens[first, d])
        parent.append(at[first])
        level.append(np.full(len(first), d + 1))
        at = size + inverse.reshape(-1)
        size += len(first)
    starts.append(size)
    return TreeLayout(
        token=torch.from_numpy(np.concatenate(token)),
        parent=torch.from_numpy(np.concatenate(parent)),
        depth=torch.from_numpy(np.concatenate(level)),
        n_inputs=starts[-2] - 1,
        items=torch.from_numpy(items[first]),  # rows are distinct: one leaf per row
        level_starts=starts,
    )


def layouts(tries: Sequence[Trie], *, max_inputs: int | None = None) -> list[TreeLayout | None]:
    """`layout` of each trie (None where it would feed more than `max_inputs` tree tokens), for a batch at once:
    the tries kept as token arrays (a request's retrieved candidates) laid out together, one np.unique per depth
    over all of them (`_layout_arrays`) instead of one per depth per trie; the others one by one."""
    out: list[TreeLayout | None] = [None] * len(tries)
    together = [i for i, t in enumerate(tries) if t.derived is None and t.array is not None and t.depth >= 1]
    depths = {tries[i].array[0].shape[1] for i in together}  # type: ignore[index]
    if len(together) < 2 or len(depths) != 1 or not _keys_fit([tries[i].array[0] for i in together]):  # type: ignore[index]
        together = []
    else:
        made = _layout_arrays([tries[i].array for i in together], max_inputs=max_inputs)  # type: ignore[misc]
        for i, lay in zip(together, made, strict=True):
            out[i] = lay
    done = set(together)
    for i, t in enumerate(tries):
        if i not in done:
            out[i] = layout(t, max_inputs=max_inputs)
    return out


def _keys_fit(tokens: Sequence[np.ndarray]) -> bool:
    """Whether `_layout_arrays`'s int64 keys (trie, parent node, token) cannot overflow for these token arrays: below
    tries x nodes x (largest token + 1), in Python's integers."""
    rows = sum(len(t) for t in tokens)
    top = max((int(t.max()) for t in tokens if t.size), default=0)
    nodes = rows * max((t.shape[1] for t in tokens), default=1) + 1  # bounds a node's number within its trie
    return len(tokens) * nodes * (top + 1) < 2**62


def _layout_arrays(
    arrays: Sequence[tuple[np.ndarray, np.ndarray]], *, max_inputs: int | None
) -> list[TreeLayout | None]:
    """`_layout_array` of each (tokens, items) pair, all of the same depth and each with at least one row, in one
    pass: each depth's nodes are the distinct (trie, parent node, token) triples, found by one np.unique over every
    trie's rows, whose sorted order is each trie's own (parent, token) order, trie after trie. The nodes of every
    depth are then put in trie order by one stable sort and cut into the tries' layouts."""
    n_tries = len(arrays)
    sizes = np.array([len(t) for t, _ in arrays], dtype=np.int64)
    tokens = np.concatenate([t for t, _ in arrays]).astype(np.int64, copy=False)
    items = np.concatenate([i for _, i in arrays])
    depth = tokens.shape[1]
    owner = np.repeat(np.arange(n_tries, dtype=np.int64), sizes)  # each row's trie
    at = np.zeros(
        len(tokens), dtype=np.int64
    )  # each row's node at the current depth, numbered within its trie
    size = np.ones(n_tries, dtype=np.int64)  # nodes of each trie so far (the root)
    node_owner, node_token, node_parent, node_depth = (
        [np.arange(n_tries, dtype=np.int64)],
        [np.full(n_tries, -1, dtype=np.int64)],
        [np.full(n_tries, -1, dtype=np.int64)],
        [np.zeros(n_tries, dtype=np.int64)],
    )
    counts = np.zeros((depth, n_tries), dtype=np.int64)  # nodes per depth per trie
    first = np.zeros(0, dtype=np.int64)
    for d in range(depth):
        col = tokens[:, d]
        key = (owner * (int(at.max()) + 1) + at) * (int(col.max()) + 1) + col
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        whose = owner[first]
        counts[d] = np.bincount(whose, minlength=n_tries)
        local = np.arange(len(first)) - (np.cumsum(counts[d]) - counts[d])[whose]  # order within its trie
        number = size[whose] + local
        node_owner.append(whose)
        node_token.append(col[first])
        node_parent.append(at[first])
        node_depth.append(np.full(len(first), d + 1, dtype=np.int64))
        at = number[inverse.reshape(-1)]
        size += counts[d]
    order = np.argsort(np.concatenate(node_owner), kind="stable")  # each trie's nodes, depth by depth
    cuts = np.cumsum(size)[:-1]
    per_trie = [np.split(np.concatenate(a)[order], cuts) for a in (node_token, node_parent, node_depth)]
    leaf_items = np.split(items[first], np.cumsum(counts[-1])[:-1])  # leaves in node order, trie after trie
    # each trie's level starts after the root's 0: 1 (its first depth-1 node), then 1 + the nodes down to each depth
    starts = (
        1 + np.concatenate([np.zeros((1, n_tries), dtype=np.int64), np.cumsum(counts, axis=0)])
    ).T.tolist()
    out: list[TreeLayout | None] = []
    for t in range(n_tries):
        level_starts = [0, *starts[t]]
        n_inputs = level_starts[-2] - 1
        if max_inputs is not None and depth > 1 and n_inputs > max_inputs:
            out.append(None)
            continue
        out.append(
            TreeLayout(
                token=torch.from_numpy(per_trie[0][t]),
                parent=torch.from_numpy(per_trie[1][t]),
                depth=torch.from_numpy(per_trie[2][t]),
                n_inputs=n_inputs,
                items=torch.from_numpy(leaf_items[t]),
                level_starts=level_starts,
            )
        )
    return out


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]) without the Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(
        np.asarray(starts, dtype=np.int64) - before, lengths
    )


def to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 arrays as tensors on `device`. On a GPU, one pinned buffer and one copy that does not wait for
    the work already queued (a plain `.to(device)` waits for it), split into views there; on a CPU, the
    arrays themselves. Any other device gets the same one non-blocking copy (unpinned): the CPU tests run
    the launch path on `meta` tensors to show it never waits (tests/sync_audit.py)."""
    if device.type == "cpu":
        return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in arrays]
    flat = torch.from_numpy(np.concatenate([np.ravel(a).astype(np.int64, copy=False) for a in arrays]))
    moved = (flat.pin_memory() if device.type == "cuda" else flat).to(device, non_blocking=True)
    return [
        part.view(a.shape)
        for part, a in zip(moved.split([int(np.size(a)) for a in arrays]), arrays, strict=True)
    ]


class TopItems:
    """Each layout's k best items and their log-probs (`item_scores`, best first, ties in trie order) for a
    batch of layouts at once, in three steps so that the device never waits for the CPU in between:

    1. here, the index arrays on the CPU, from the layouts alone (path-sum order, leaves, padding);
    2. `launch(edge_logp)` queues the device work (path sums level by level over all rows together, one
       padded stable sort, the top k copied out) and returns without waiting for it;
    3. `result()` waits for that copy and returns the lists.

    `edge_logp`: every row's non-root nodes' edge log-probs, rows concatenated (node 1 .. N-1 of each).
    """

    def __init__(self, lays: Sequence[TreeLayout], k: int) -> None:
        self.k = k
        self.n_leaves = [len(lay.items) for lay in lays]
        sizes = np.array([lay.token.shape[0] for lay in lays], dtype=np.int64)
        offsets = np.cumsum(sizes) - sizes
        self.total, self.width = int(sizes.sum()), max(self.n_leaves, default=0)
        if not lays:
            return
        # every row's nodes, rows concatenated: node i of row b is offsets[b] + i
        parent = np.concatenate([lay.parent.numpy() for lay in lays]) + np.repeat(offsets, sizes)
        depth = np.concatenate([lay.depth.numpy() for lay in lays])
        nonroot = np.ones(self.total, dtype=bool)
        nonroot[offsets] = False
        # depth-1 nodes score their edge alone; deeper ones add their parent's sum, level by level
        levels = []
        for d in range(2, int(depth.max()) + 1):
            at = np.flatnonzero(depth == d)
            levels += [at, parent[at]]
        n_leaves = np.array(self.n_leaves, dtype=np.int64)
        leaf = concat_ranges(offsets + sizes - n_leaves, n_leaves)  # leaves come last in each row
        row = np.repeat(np.arange(len(lays)), n_leaves)
        slot = concat_ranges(np.zeros(len(lays), dtype=np.int64), n_leaves)
        items = np.concatenate([lay.items.numpy() for lay in lays])
        self.arrays = [np.flatnonzero(nonroot), leaf, row, slot, items, *levels]
        self.pending: tuple[torch.Tensor, torch.Tensor, Any] | None = None

    def launch(self, edge_logp: torch.Tensor) -> TopItems:
        """Queue the device work on `edge_logp`'s device; no waiting for it (on a GPU)."""
        if not self.n_leaves:
            return self
        device = edge_logp.device
        nonroot, leaf, row, slot, items_cat, *levels = to_device(self.arrays, device)
        score = torch.zeros(self.total, dtype=torch.float64, device=device)
        score[nonroot] = edge_logp.double()
        for at, parent in zip(levels[::2], levels[1::2], strict=True):
            score[at] += score[parent]
        rows = len(self.n_leaves)
        padded = torch.full((rows, self.width), float("-inf"), dtype=torch.float64, device=device)
        padded[row, slot] = score[leaf]
        items = torch.full((rows, self.width), -1, dtype=torch.long, device=device)
        items[row, slot] = items_cat
        top, order = torch.sort(padded, dim=1, descending=True, stable=True)
        keep = min(self.k, self.width)
        top, chosen = top[:, :keep], torch.gather(items, 1, order[:, :keep])
        if device.type == "cuda":  # into pinned memory without waiting; `result` waits for this copy alone
            host = (
                torch.empty(top.shape, dtype=top.dtype, pin_memory=True),
                torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True),
            )
            host[0].copy_(top, non_blocking=True)
            host[1].copy_(chosen, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.pending = (*host, done)
        else:
            self.pending = (top, chosen, None)
        return self

    def result(self) -> list[tuple[list[int], list[float]]]:
        if not self.n_leaves:
            return []
        assert self.pending is not None, "launch() first"
        top, chosen, done = self.pending
        if done is not None:
            done.synchronize()
        k = self.k
        return [
            (chosen[i, : min(k, n)].tolist(), top[i, : min(k, n)].tolist())
            for i, n in enumerate(self.n_leaves)
        ]


def batch_top_items(
    lays: Sequence[TreeLayout], edge_logp: torch.Tensor, k: int
) -> list[tuple[list[int], list[float]]]:
    """`TopItems` in one call: each layout's k best items and their log-probs, best first, ties in trie order."""
    return TopItems(lays, k).launch(edge_logp).result()
