"""Prefix trie over fixed-length token sequences, each ending at one item.

The trie knows nothing of tokenizers or models: it maps integer sequences to integer items and
answers "which next integers extend this prefix".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
    """Immutable trie of equal-length sequences; `sequences[i]` leads to `items[i]`."""

    def __init__(self, sequences: Sequence[Sequence[int]], items: Sequence[int] | None = None) -> None:
        items = list(range(len(sequences))) if items is None else list(items)
        if len(items) != len(sequences):
            raise ValueError("sequences and items differ in length")
        self.root = TrieNode()
        self.depth = len(sequences[0]) if len(sequences) else 0
        self._len = 0
        for seq, item in zip(sequences, items, strict=True):
            if len(seq) != self.depth:
                raise ValueError(f"all sequences must have length {self.depth}; item {item} has {len(seq)}")
            node = self.root
            for tok in seq:
                node = node.children.setdefault(int(tok), TrieNode())
            if node.item is not None:
                if node.item == item:
                    continue
                raise ValueError(f"items {node.item} and {item} share the sequence {list(seq)}")
            node.item = int(item)
            self._len += 1

    def __len__(self) -> int:
        return self._len

    def without(self, sequences: Sequence[Sequence[int]]) -> Trie:
        """A trie minus some sequences, sharing every untouched subtree with this one.

        Costs O(len(sequences) x depth), not O(trie): nodes on the removed paths are copied, the
        rest is shared, and emptied branches are pruned so every remaining prefix reaches an item.
        """
        new = Trie([])
        new.depth, new._len = self.depth, self._len
        new.root = _copy(self.root)
        copied = {id(new.root)}
        for seq in sequences:
            path = [new.root]
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


def _copy(node: TrieNode) -> TrieNode:
    out = TrieNode()
    out.children = dict(node.children)
    out.item = node.item
    return out
