"""Prefix trie over fixed-length token sequences, each ending at one item.

The trie knows nothing of tokenizers or models: it maps integer sequences to integer items and
answers "which next integers extend this prefix".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class TrieNode:
    __slots__ = ("_tensor", "children", "item")

    def __init__(self) -> None:
        self.children: dict[int, TrieNode] = {}
        self.item: int | None = None
        self._tensor: torch.Tensor | None = None

    def allowed(self) -> torch.Tensor:
        """The next tokens as a LongTensor (cached: the trie is immutable once built)."""
        if self._tensor is None:
            self._tensor = torch.tensor(list(self.children), dtype=torch.long)
        return self._tensor


class Trie:
    """Immutable trie of equal-length sequences; `sequences[i]` leads to `items[i]`.

    `Trie.from_array` keeps the sequences as one array and builds nodes only when something walks
    them: exact tree scoring lays the array out directly (genrec.decoding.tree), so a request
    ranked that way never pays for hundreds of node objects. A trie made by `without` remembers
    its base and what was removed, and tree scoring derives its layout from the base's.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], items: Sequence[int] | None = None) -> None:
        items = list(range(len(sequences))) if items is None else list(items)
        if len(items) != len(sequences):
            raise ValueError("sequences and items differ in length")
        self._root: TrieNode | None = TrieNode()
        self.array: tuple[np.ndarray, np.ndarray] | None = None
        """(tokens (n, depth), items (n,)): the distinct sequences, in first-seen order (None: `without`)."""
        self.derived: tuple[Trie, list[tuple[int, ...]]] | None = None
        """(base trie, removed sequences) for a trie made by `without`."""
        self.depth = len(sequences[0]) if len(sequences) else 0
        self._len = 0
        rows: list[Sequence[int]] = []
        kept: list[int] = []
        for seq, item in zip(sequences, items, strict=True):
            if len(seq) != self.depth:
                raise ValueError(f"all sequences must have length {self.depth}; item {item} has {len(seq)}")
            if _insert(self._root, seq, int(item)):
                rows.append(seq)
                kept.append(int(item))
        self._len = len(kept)
        tokens = np.asarray(rows, dtype=np.int64).reshape(len(rows), self.depth)
        self.array = (tokens, np.asarray(kept, dtype=np.int64))

    @classmethod
    def from_array(
        cls, tokens: np.ndarray, items: Sequence[int] | np.ndarray, *, distinct: bool = False
    ) -> Trie:
        """A trie over the rows of a (n, depth) token array; nodes are built on first use.

        `distinct=True` promises the rows are distinct already (e.g. distinct catalogue items) and
        skips the check for repeated rows.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if tokens.size == 0:
            tokens = tokens.reshape(0, 0)
        if tokens.ndim != 2 or len(items) != len(tokens):
            raise ValueError("tokens must be (n, depth) with one item per row")
        if not distinct:  # drop repeated rows; one sequence may not lead to two items
            _, first, inverse = np.unique(tokens, axis=0, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
            clash = np.flatnonzero(items != items[first][inverse])
            if len(clash):
                r = int(clash[0])
                raise ValueError(
                    f"items {int(items[first[inverse[r]]])} and {int(items[r])} share the sequence "
                    f"{tokens[r].tolist()}"
                )
            keep = np.sort(first)
            tokens, items = tokens[keep], items[keep]
        new = cls([])
        new._root, new.array = None, (tokens, items)
        new.depth, new._len = (int(tokens.shape[1]), len(tokens)) if len(tokens) else (0, 0)
        return new

    @property
    def root(self) -> TrieNode:
        if self._root is None:
            if self.derived is not None:  # made by `without`: prune a copy of the base's paths
                base, removed = self.derived
                self._root = _pruned(base.root, removed)
            else:
                assert self.array is not None
                self._root = TrieNode()
                for seq, item in zip(self.array[0].tolist(), self.array[1].tolist(), strict=True):
                    _insert(self._root, seq, item)
        return self._root

    def __len__(self) -> int:
        return self._len

    def without(self, sequences: Sequence[Sequence[int]]) -> Trie:
        """A trie minus some sequences (those it does not hold are ignored).

        Costs O(len(sequences) x depth), not O(trie), and nothing is built until something walks
        the nodes: then only the nodes on the removed paths are copied, the rest is shared with the
        base, and emptied branches are pruned so every remaining prefix reaches an item. Exact tree
        scoring never walks them (genrec.decoding.tree derives the layout from the base's).
        """
        base, removed = self.derived or (self, [])
        already = set(removed)
        gone = {tuple(int(t) for t in seq) for seq in sequences} - already
        gone = {seq for seq in gone if base.get(seq) is not None}
        new = Trie([])
        new.depth, new._len, new.array, new._root = self.depth, self._len - len(gone), None, None
        new.derived = (base, [*removed, *sorted(gone)])
        return new

    def node(self, prefix: Sequence[int]) -> TrieNode | None:
        node: TrieNode | None = self.root
        for tok in prefix:
            node = node.children.get(int(tok)) if node is not None else None
            if node is None:
                return None
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that extend `prefix` towards some item (empty if none does)."""
        node = self.node(prefix)
        return list(node.children) if node is not None else []

    def get(self, sequence: Sequence[int]) -> int | None:
        node = self.node(sequence)
        return node.item if node is not None else None

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], int]]:
        stack: list[tuple[TrieNode, tuple[int, ...]]] = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            if node.item is not None:
                yield prefix, node.item
            stack.extend((child, (*prefix, tok)) for tok, child in node.children.items())


def _insert(root: TrieNode, seq: Sequence[int], item: int) -> int:
    """Add one sequence; 1 if it is new, 0 if it was there with the same item (another item: an error)."""
    node = root
    for tok in seq:
        child = node.children.get(int(tok))
        if child is None:
            child = node.children[int(tok)] = TrieNode()
        node = child
    if node.item is not None:
        if node.item == item:
            return 0
        raise ValueError(f"items {node.item} and {item} share the sequence {list(seq)}")
    node.item = item
    return 1


def _copy(node: TrieNode) -> TrieNode:
    out = TrieNode()
    out.children = dict(node.children)
    out.item = node.item
    return out


def _pruned(root: TrieNode, removed: Sequence[Sequence[int]]) -> TrieNode:
    """A copy of `root` without the `removed` sequences (each held by it), sharing untouched subtrees."""
    new_root = _copy(root)
    copied = {id(new_root)}
    for seq in removed:
        path = [new_root]
        for tok in seq:
            node = path[-1]
            child = node.children[tok]
            if id(child) not in copied:
                child = node.children[tok] = _copy(child)
                copied.add(id(child))
            path.append(child)
        path[-1].item = None
        for level in range(len(seq) - 1, -1, -1):
            child = path[level + 1]
            if child.children or child.item is not None:
                break
            del path[level].children[seq[level]]
    return new_root
