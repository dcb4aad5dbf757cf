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
    ranked that way never pays for hundreds of node objects.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], items: Sequence[int] | None = None) -> None:
        items = list(range(len(sequences))) if items is None else list(items)
        if len(items) != len(sequences):
            raise ValueError("sequences and items differ in length")
        self._root: TrieNode | None = TrieNode()
        self.array: tuple[np.ndarray, np.ndarray] | None = None
        """(tokens (n, depth), items (n,)) with distinct rows, for tries made by from_array."""
        self.depth = len(sequences[0]) if len(sequences) else 0
        self._len = 0
        for seq, item in zip(sequences, items, strict=True):
            if len(seq) != self.depth:
                raise ValueError(f"all sequences must have length {self.depth}; item {item} has {len(seq)}")
            self._len += _insert(self._root, seq, int(item))

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
            assert self.array is not None
            self._root = TrieNode()
            for seq, item in zip(self.array[0].tolist(), self.array[1].tolist(), strict=True):
                _insert(self._root, seq, item)
        return self._root

    def __len__(self) -> int:
        return self._len

    def without(self, sequences: Sequence[Sequence[int]]) -> Trie:
        """A trie minus some sequences, sharing every untouched subtree with this one.

        Costs O(len(sequences) x depth), not O(trie): nodes on the removed paths are copied, the
        rest is shared, and emptied branches are pruned so every remaining prefix reaches an item.
        """
        new = Trie([])
        new.depth, new._len = self.depth, self._len
        new._root = _copy(self.root)
        copied = {id(new._root)}
        for seq in sequences:
            path = [new._root]
            for tok in seq:
                node = path[-1]
                child = node.children.get(int(tok))
                if child is None:
                    break
                if id(child) not in copied:
                    child = node.children[int(tok)] = _copy(child)
                    copied.add(id(child))
                path.append(child)
            if len(path) != len(seq) + 1 or path[-1].item is None:
                continue
            path[-1].item = None
            new._len -= 1
            for level in range(len(seq) - 1, -1, -1):
                child = path[level + 1]
                if child.children or child.item is not None:
                    break
                del path[level].children[int(seq[level])]
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
