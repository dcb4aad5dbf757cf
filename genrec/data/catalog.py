"""The item catalogue and chronological user sequences, plus cleaning and the leave-one-out split.

Owns: item identity (external id <-> row index), item text, per-user chronological item lists,
k-core filtering, deduplication and the split. Knows nothing of file formats (see loaders) or IDs.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Catalog:
    """Items in a fixed order; row index is the item's internal index everywhere in genrec."""

    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    attributes: list[dict[str, str]] = field(default_factory=list)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.item_ids:
            raise DataError("the catalogue is empty", path=self.source)
        if not (len(self.item_ids) == len(self.titles) == len(self.texts)):
            raise DataError("item_ids, titles and texts differ in length", path=self.source)
        if not self.attributes:
            self.attributes = [{} for _ in self.item_ids]
        self.index: dict[str, int] = {}
        for row, item in enumerate(self.item_ids):
            if item in self.index:
                raise DataError(
                    f"duplicate item id {item!r} (rows {self.index[item]} and {row})",
                    path=self.source,
                    field="item_id",
                )
            self.index[item] = row

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def has_text(self) -> bool:
        """True when most items have text worth embedding."""
        return sum(bool(t.strip()) for t in self.texts) >= 0.5 * len(self.texts)

    def subset(self, rows: list[int]) -> Catalog:
        return Catalog(
            [self.item_ids[r] for r in rows],
            [self.titles[r] for r in rows],
            [self.texts[r] for r in rows],
            [self.attributes[r] for r in rows],
            source=self.source,
        )

    def to_parquet(self, path: str | Path) -> None:
        df = pd.DataFrame({"item_id": self.item_ids, "title": self.titles, "text": self.texts})
        keys = sorted({k for a in self.attributes for k in a})
        for k in keys:
            df[f"attr_{k}"] = [a.get(k, "") for a in self.attributes]
        df.to_parquet(path, index=False)

    @classmethod
    def from_parquet(cls, path: str | Path) -> Catalog:
        df = pd.read_parquet(path)
        attr_cols = [c for c in df.columns if c.startswith("attr_")]
        attrs = [
            {c[5:]: str(v) for c, v in zip(attr_cols, row, strict=True)}
            for row in df[attr_cols].itertuples(index=False)
        ]
        return cls(
            df["item_id"].astype(str).tolist(),
            df["title"].tolist(),
            df["text"].tolist(),
            attrs,
            source=str(path),
        )


@dataclass
class Interactions:
    """Chronological item sequences, one per user, as catalogue row indices."""

    catalog: Catalog
    users: list[str]
    sequences: list[list[int]]

    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.users)}

    def to_parquet(self, path: str | Path) -> None:
        ids = self.catalog.item_ids
        pd.DataFrame(
            {"user_id": self.users, "items": [[ids[i] for i in s] for s in self.sequences]}
        ).to_parquet(path, index=False)

    @classmethod
    def from_parquet(cls, path: str | Path, catalog: Catalog) -> Interactions:
        df = pd.read_parquet(path)
        seqs = []
        for line, items in enumerate(df["items"], start=1):
            try:
                seqs.append([catalog.index[str(i)] for i in items])
            except KeyError as e:
                raise DataError(f"unknown item {e.args[0]!r}", path=path, line=line, field="items") from None
        return cls(catalog, df["user_id"].astype(str).tolist(), seqs)


@dataclass(frozen=True)
class Example:
    """One prediction task: a user's history (oldest first) and the item that came next."""

    user: str
    history: tuple[int, ...]
    target: int


def dedupe(sequences: list[list[int]]) -> tuple[list[list[int]], int]:
    """Keep each user's first interaction with an item; return sequences and the number dropped."""
    out, dropped = [], 0
    for seq in sequences:
        seen: set[int] = set()
        kept = [i for i in seq if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]
        dropped += len(seq) - len(kept)
        out.append(kept)
    return out, dropped


def kcore(users: list[str], sequences: list[list[int]], k: int) -> tuple[list[str], list[list[int]]]:
    """Iteratively drop users and items with fewer than k interactions until stable."""
    if k <= 1:
        return users, sequences
    while True:
        counts = Counter(i for s in sequences for i in s)
        kept_seqs = [[i for i in s if counts[i] >= k] for s in sequences]
        pairs = [(u, s) for u, s in zip(users, kept_seqs, strict=True) if len(s) >= k]
        changed = len(pairs) != len(users) or any(
            len(a) != len(b) for a, b in zip(kept_seqs, sequences, strict=True)
        )
        users, sequences = [u for u, _ in pairs], [s for _, s in pairs]
        if not changed:
            return users, sequences


def clean(
    catalog: Catalog,
    users: list[str],
    sequences: list[list[int]],
    *,
    kcore_k: int,
    deduplicate: bool = True,
    max_seq_len: int | None = None,
) -> Interactions:
    """Dedupe, k-core, drop too-short users and unused items; log every count that changes."""
    n_before = sum(len(s) for s in sequences)
    if deduplicate:
        sequences, dropped = dedupe(sequences)
        if dropped:
            logger.info("dedupe: dropped %d repeated (user, item) interactions", dropped)
    if max_seq_len:
        sequences = [s[-max_seq_len:] for s in sequences]
    users, sequences = kcore(users, sequences, kcore_k)
    short = sum(len(s) < 3 for s in sequences)
    if short:
        logger.info("dropped %d users with fewer than 3 interactions (leave-one-out needs 3)", short)
    pairs = [(u, s) for u, s in zip(users, sequences, strict=True) if len(s) >= 3]
    if not pairs:
        raise DataError(f"no user has >= 3 interactions after {kcore_k}-core filtering", path=catalog.source)
    used = sorted({i for _, s in pairs for i in s})
    remap = {old: new for new, old in enumerate(used)}
    if len(used) < len(catalog):
        logger.info(
            "catalogue: kept %d of %d items (the rest have no interactions left)", len(used), len(catalog)
        )
    sub = catalog.subset(used)
    seqs = [[remap[i] for i in s] for _, s in pairs]
    n_after = sum(len(s) for s in seqs)
    logger.info(
        "cleaned: %d users, %d items, %d interactions (%d dropped)",
        len(pairs),
        len(sub),
        n_after,
        n_before - n_after,
    )
    return Interactions(sub, [u for u, _ in pairs], seqs)


def leave_one_out(data: Interactions, split: str) -> list[Example]:
    """Chronological leave-one-out: `test` predicts the last item, `valid` the second-last."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cut = 1 if split == "test" else 2
    return [Example(u, tuple(s[:-cut]), s[-cut]) for u, s in zip(data.users, data.sequences, strict=True)]


def train_examples(data: Interactions, *, per_user: int = 0, min_history: int = 1) -> list[Example]:
    """Every next-item prediction inside each user's training part (all but the last two items)."""
    out: list[Example] = []
    for u, s in zip(data.users, data.sequences, strict=True):
        train = s[:-2]
        positions = range(min_history, len(train))
        if per_user > 0:
            positions = range(max(min_history, len(train) - per_user), len(train))
        out.extend(Example(u, tuple(train[:t]), train[t]) for t in positions)
    return out


def history_windows(data: Interactions, *, window: int, per_user: int = 0) -> list[Example]:
    """Rows for the history loss: up to `window` history items and the item after them.

    Windows are cut from the end of each user's training part (all but the last two items) and overlap by
    one item, so every position after a user's first is a target exactly once: as the answer of one window
    or as a history item after that window's first. `per_user` N > 0 keeps only the last N targets.
    """
    out: list[Example] = []
    for u, s in zip(data.users, data.sequences, strict=True):
        train = s[:-2]
        if per_user > 0:
            train = train[-(per_user + 1) :]
        for end in range(len(train), 1, -window):
            seg = train[max(0, end - window - 1) : end]
            out.append(Example(u, tuple(seg[:-1]), seg[-1]))
    return out


AUGMENT_KINDS = ("crop", "mask", "reorder")
"""The sequence augmentations of train.augment (CL4SRec's three; see augment_sequence)."""


def augment_sequence(
    seq: tuple[int, ...], kind: str, ratio: float, rng: np.random.Generator
) -> tuple[int, ...]:
    """One augmented copy of an item sequence: a transformation that adds no item and keeps at least two.

    `ratio` is the share of the sequence the operator touches, as CL4SRec's eta / gamma / beta:
    - `crop` keeps a contiguous sub-sequence of max(2, floor((1 - ratio) * n)) items: the same transitions
      seen with less context before them.
    - `mask` drops max(1, floor(ratio * n)) items at random positions and keeps the rest in order. CL4SRec
      replaces them with a [mask] item, but genrec shows a history as rendered item IDs and trains on each shown
      ID: a placeholder would be text the model never meets at inference and must not be a label, while a
      dropped item is what a real history looks like when some interactions went unlogged.
    - `reorder` shuffles a contiguous span of max(2, floor(ratio * n)) items: nearby interactions whose order
      carries little signal.
    Sequences of two items are returned unchanged by `mask` (one item would leave no transition).
    """
    n = len(seq)
    if n < 2:
        return seq
    if kind == "crop":
        keep = min(n, max(2, int(np.floor((1 - ratio) * n))))
        start = int(rng.integers(0, n - keep + 1))
        return seq[start : start + keep]
    if kind == "mask":
        drop = min(n - 2, max(1, int(np.floor(ratio * n))))
        gone = set(rng.choice(n, size=drop, replace=False).tolist()) if drop > 0 else set()
        return tuple(item for k, item in enumerate(seq) if k not in gone)
    if kind == "reorder":
        span = min(n, max(2, int(np.floor(ratio * n))))
        start = int(rng.integers(0, n - span + 1))
        mid = [seq[start + k] for k in rng.permutation(span)]
        return seq[:start] + tuple(mid) + seq[start + span :]
    raise ValueError(f"unknown augmentation {kind!r}; choose from {list(AUGMENT_KINDS)}")


def augment_examples(
    examples: list[Example], kinds: list[str], *, ratio: float, copies: int, seed: int = 0
) -> list[Example]:
    """`copies` augmented rows per example (train.augment; none when `kinds` is empty), each made by one of
    `kinds` drawn at random, seeded by `seed`; returned in the examples' order, without the originals.

    An operator transforms the example's whole sequence, history and answer: the augmented row's answer is its
    last item. With train.history_loss every shown item of a row is a label, so a row is one sequence and its
    labels are its own shown items; without it the answer is the only label. Operators only select and reorder
    the example's own items, so a row holds nothing the example did not (the training part of one user: never
    a validation or test target, nor an item held out by data.cold_items)."""
    if not kinds or copies <= 0:
        return []
    unknown = sorted(set(kinds) - set(AUGMENT_KINDS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from {list(AUGMENT_KINDS)}")
    rng = np.random.default_rng([seed, 0xA06])
    out: list[Example] = []
    for ex in examples:
        seq = (*ex.history, ex.target)
        for _ in range(copies):
            aug = augment_sequence(seq, kinds[int(rng.integers(len(kinds)))], ratio, rng)
            out.append(Example(ex.user, aug[:-1], aug[-1]))
    return out


def cold_item_rows(n_items: int, share: float, *, seed: int = 0) -> list[int]:
    """The catalogue rows held out of training (data.cold_items): a seeded `share` of the items, sorted."""
    if share <= 0:
        return []
    rng = np.random.default_rng([seed, 0xC01D])
    k = max(1, round(share * n_items))
    return sorted(rng.choice(n_items, size=k, replace=False).tolist())


def without_items(data: Interactions, items: set[int] | list[int]) -> Interactions:
    """The data as training may see it when `items` are held out: they are removed from every user's training
    part (all but the last two items); the last two (the validation and test targets) stay in place, so
    `leave_one_out` still finds them and `history_windows` / `train_examples` never show a held-out item."""
    banned = set(items)
    if not banned:
        return data
    seqs = [[i for i in s[:-2] if i not in banned] + s[-2:] for s in data.sequences]
    return Interactions(data.catalog, list(data.users), seqs)


def popularity(data: Interactions, *, split: str = "test") -> np.ndarray:
    """Interaction counts per item from the part of the data visible before `split`'s targets."""
    cut = 1 if split == "test" else 2
    counts = np.zeros(len(data.catalog), dtype=np.int64)
    for s in data.sequences:
        np.add.at(counts, s[:-cut], 1)
    return counts
