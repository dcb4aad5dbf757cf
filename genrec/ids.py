"""Item identifiers: semantic IDs (residual k-means + a collision level) or atomic (one token per item).

Owns the mapping item row <-> code tuple <-> token strings, the codebooks, and cold-start
assignment of a new item from its embedding. Every item has the same number of tokens, so a
constrained beam search of fixed depth ranks complete IDs. Knows nothing of tokenizers or models.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genrec.errors import GenrecError

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"<([a-z]+)_(\d+)>")
INPUT_TOKEN = "<in_{}>"


def level_name(level: int, scheme: str) -> str:
    return "item" if scheme == "atomic" else chr(ord("a") + level)


@dataclass
class ItemIds:
    """Per-item code tuples (rows align with the catalogue) and the token vocabulary they use."""

    scheme: str
    codes: np.ndarray
    """[n_items, depth] int codes."""
    level_sizes: list[int]
    """Number of distinct tokens at each level (the last semantic level is the collision level)."""
    codebooks: list[np.ndarray] = field(default_factory=list)
    """Residual k-means centroids per level (semantic only), for cold start."""
    input_items: int = 0
    """Items 0..input_items-1 also have an input token `<in_ROW>` (ids.input_tokens): one position and one
    embedding row of their own where a prompt shows them. Decoding never writes it: an answer is its codes.
    Items registered later (cold start) have none."""

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        self._by_code = {tuple(int(c) for c in row): i for i, row in enumerate(self.codes)}
        if len(self._by_code) != len(self.codes):
            raise GenrecError("item IDs are not unique")

    @property
    def depth(self) -> int:
        return int(self.codes.shape[1])

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def token(self, level: int, code: int) -> str:
        return f"<{level_name(level, self.scheme)}_{code}>"

    def level_tokens(self) -> list[list[str]]:
        """Each level's ID tokens: what the model may write at that level (input tokens are never written)."""
        return [[self.token(lv, c) for c in range(n)] for lv, n in enumerate(self.level_sizes)]

    def tokens_only_of(self, items: Collection[int]) -> set[str]:
        """The ID tokens that `items` use and no other item does, level by level: every token of a held-out
        item under atomic IDs; under semantic IDs only the codes no other item shares (its shared prefixes are
        other items' too)."""
        rows = np.zeros(len(self.codes), dtype=bool)
        rows[list(items)] = True
        out = set()
        for lv in range(self.depth):
            theirs = set(self.codes[rows, lv].tolist()) - set(self.codes[~rows, lv].tolist())
            out |= {self.token(lv, c) for c in theirs}
        return out

    def vocabulary(self) -> list[str]:
        """Every ID token, level by level, then the input tokens: the tokens to add to a tokenizer."""
        codes = [t for level in self.level_tokens() for t in level]
        return codes + [INPUT_TOKEN.format(i) for i in range(self.input_items)]

    def input_token(self, item: int) -> str:
        """The item's input token, or "" where it has none (ids.input_tokens off; a cold-start item)."""
        return INPUT_TOKEN.format(item) if item < self.input_items else ""

    def item_tokens(self, item: int) -> list[str]:
        return [self.token(lv, int(c)) for lv, c in enumerate(self.codes[item])]

    def item_string(self, item: int) -> str:
        return "".join(self.item_tokens(item))

    def parse(self, text: str) -> int | None:
        """Item row for an ID string like `<a_3><b_1><c_7><d_0>` (an input token after it, as a prompt shows
        it, is ignored), or None if it is not an item."""
        found = [f for f in _TOKEN.findall(text) if f[0] != "in"]
        if len(found) != self.depth:
            return None
        names = [level_name(lv, self.scheme) for lv in range(self.depth)]
        if [n for n, _ in found] != names:
            return None
        return self._by_code.get(tuple(int(c) for _, c in found))

    def assign(self, embedding: np.ndarray) -> tuple[int, ...]:
        """Cold start: the code tuple a new item with this embedding gets (not yet registered): the nearest
        code at each level and the first free collision number under it. Where that prefix has no free
        collision number, the next-nearest last-level code that has one (IDs built with ids.spread_last
        keep the collision level small, so this is where a crowded region's new items go)."""
        if self.scheme != "semantic" or not self.codebooks:
            raise GenrecError("cold start needs semantic IDs with saved codebooks (ids.scheme=semantic)")
        residual = np.asarray(embedding, dtype=np.float32).copy()
        prefix = []
        for book in self.codebooks[:-1]:
            c = int(np.argmin(((book - residual) ** 2).sum(1)))
            prefix.append(c)
            residual -= book[c]
        under = self.codes[(self.codes[:, :-2] == prefix).all(1)]  # items sharing the codes before the last
        for last in np.argsort(((self.codebooks[-1] - residual) ** 2).sum(1), kind="stable"):
            used = set(under[under[:, -2] == last, -1].tolist())
            free = [c for c in range(self.level_sizes[-1]) if c not in used]
            if free:
                return (*prefix, int(last), free[0])
        raise GenrecError(
            f"no free collision code under prefix {prefix}: all {self.level_sizes[-1]} are used at every "
            "last-level code; rebuild IDs with a larger ids.collision_headroom"
        )

    def add(self, codes: Sequence[int]) -> int:
        """Register a new item's code tuple; returns its row."""
        key = tuple(int(c) for c in codes)
        if key in self._by_code:
            raise GenrecError(f"ID {key} is already taken by item row {self._by_code[key]}")
        self.codes = np.vstack([self.codes, np.asarray(key, dtype=np.int64)[None]])
        self._by_code[key] = len(self.codes) - 1
        return len(self.codes) - 1

    def save(self, folder: str | Path, item_ids: Sequence[str]) -> None:
        folder = Path(folder)
        payload = {
            "scheme": self.scheme,
            "level_sizes": self.level_sizes,
            "items": {item: self.item_string(i) for i, item in enumerate(item_ids)},
            "codes": self.codes.tolist(),
            "input_items": self.input_items,
        }
        (folder / "item_ids.json").write_text(json.dumps(payload))
        if self.codebooks:
            np.savez(folder / "codebooks.npz", *self.codebooks)

    @classmethod
    def load(cls, folder: str | Path) -> ItemIds:
        folder = Path(folder)
        payload = json.loads((folder / "item_ids.json").read_text())
        books: list[np.ndarray] = []
        if (folder / "codebooks.npz").is_file():
            with np.load(folder / "codebooks.npz") as z:
                books = [z[f"arr_{i}"] for i in range(len(z.files))]
        return cls(
            payload["scheme"],
            np.asarray(payload["codes"]),
            payload["level_sizes"],
            books,
            input_items=int(payload.get("input_items", 0)),
        )


def atomic_ids(n_items: int) -> ItemIds:
    return ItemIds("atomic", np.arange(n_items)[:, None], [n_items])


def semantic_ids(
    embeddings: np.ndarray,
    *,
    levels: int = 3,
    codes: int = 32,
    collision_headroom: int = 2,
    seed: int = 0,
    spread_last: bool = False,
) -> ItemIds:
    """Residual k-means: level l clusters the residual left by levels < l; a final collision
    level numbers items that share all l codes, so every item gets a unique ID.

    `spread_last`: items that share the first l - 1 codes take distinct last-level codes where the
    codebook has room (an optimal assignment to the last level's centroids, least total squared
    distance), instead of piling onto the nearest code and being told apart only by the collision
    token, which says nothing about the item. The collision level then numbers only what is left."""
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float32)
    residual = x.copy()
    all_codes: list[np.ndarray] = []
    books: list[np.ndarray] = []
    for level in range(levels):
        k = min(codes, len(np.unique(residual.round(6), axis=0)))
        km = KMeans(n_clusters=k, n_init=3, random_state=seed + level).fit(residual)
        centroids = km.cluster_centers_.astype(np.float32)
        if k < codes:  # keep a fixed-size codebook; unused rows are far away
            centroids = np.vstack([centroids, np.full((codes - k, x.shape[1]), 1e6, dtype=np.float32)])
        labels = km.labels_.astype(np.int64)
        if spread_last and level == levels - 1:
            labels = _spread(residual, centroids[:k], labels, all_codes)
        all_codes.append(labels)
        books.append(centroids)
        residual = residual - centroids[labels]
    groups: dict[tuple[int, ...], int] = defaultdict(int)
    collision = np.zeros(len(x), dtype=np.int64)
    for i, key in enumerate(zip(*all_codes, strict=True)):
        collision[i] = groups[key]
        groups[key] += 1
    max_group = max(groups.values())
    logger.info(
        "semantic IDs: %d items, %d distinct prefixes, largest collision group %d",
        len(x),
        len(groups),
        max_group,
    )
    return ItemIds(
        "semantic",
        np.stack([*all_codes, collision], axis=1),
        [codes] * levels + [max_group + collision_headroom],
        books,
    )


def with_cold_items(
    warm_ids: ItemIds, embeddings: np.ndarray, warm: Sequence[int], cold: Sequence[int]
) -> ItemIds:
    """IDs for a whole catalogue whose `cold` rows were held out of the codebooks: `warm_ids` were fitted on the
    `warm` rows' embeddings (in that order); each cold item then gets its code tuple as a new item would
    (`ItemIds.assign`: nearest codes, a free collision number). Rows of the result follow the catalogue."""
    grown = ItemIds(warm_ids.scheme, warm_ids.codes.copy(), list(warm_ids.level_sizes), warm_ids.codebooks)
    codes = np.zeros((len(warm) + len(cold), warm_ids.depth), dtype=np.int64)
    codes[np.asarray(warm, dtype=np.int64)] = warm_ids.codes
    for row in cold:
        new = grown.assign(embeddings[row])
        grown.add(new)
        codes[row] = new
    return ItemIds(warm_ids.scheme, codes, list(warm_ids.level_sizes), warm_ids.codebooks)


def _spread(
    residual: np.ndarray, centroids: np.ndarray, labels: np.ndarray, prefixes: list[np.ndarray]
) -> np.ndarray:
    """Last-level codes, spread over the codebook within each group of items that share the earlier
    codes: per group, the assignment of items to distinct codes with the least total squared distance;
    a group larger than the codebook is assigned in rounds (each code takes one more item per round), so
    no code holds more than ceil(group / codes) of the group's items."""
    from scipy.optimize import linear_sum_assignment

    out = labels.copy()
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    keys = zip(*prefixes, strict=True) if prefixes else [()] * len(labels)  # one level: a single group
    for i, key in enumerate(keys):
        groups[key].append(i)
    moved = 0
    for members in groups.values():
        if len(set(labels[members].tolist())) == len(members):
            continue  # already distinct (or alone): every item keeps its nearest code
        left = np.asarray(members)
        while len(left):
            cost = ((residual[left, None, :] - centroids[None, :, :]) ** 2).sum(-1)
            picked, code = linear_sum_assignment(cost)
            moved += int((out[left[picked]] != code).sum())
            out[left[picked]] = code
            left = np.delete(left, picked)
    logger.info("semantic IDs: %d items moved to a less crowded last-level code", moved)
    return out
