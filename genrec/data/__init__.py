"""Data: catalogue, chronological sequences, loaders, the synthetic generator and the split."""

from __future__ import annotations

import logging

from genrec.config import DataConfig
from genrec.data.catalog import (
    AUGMENT_KINDS,
    Catalog,
    Example,
    Interactions,
    augment_examples,
    clean,
    cold_item_rows,
    history_windows,
    leave_one_out,
    popularity,
    train_examples,
    without_items,
)
from genrec.data.loaders import load_movielens, load_sequences, load_table, load_unisrec

logger = logging.getLogger(__name__)

__all__ = [
    "AUGMENT_KINDS",
    "Catalog",
    "Example",
    "Interactions",
    "augment_examples",
    "clean",
    "cold_item_rows",
    "history_windows",
    "leave_one_out",
    "load_dataset",
    "popularity",
    "train_examples",
    "without_items",
]


def load_dataset(cfg: DataConfig) -> Interactions:
    """Load raw data as the config says, then clean it (dedupe, k-core, >= 3 interactions)."""
    from genrec.data import synthetic

    if cfg.source == "synthetic":
        raw = synthetic.generate(cfg.synthetic_items, cfg.synthetic_users, seed=cfg.seed)
    else:
        assert cfg.path is not None  # validated in config
        if cfg.source == "movielens":
            raw = load_movielens(cfg.path, min_rating=cfg.min_rating)
        elif cfg.source == "sequences":
            raw = load_sequences(cfg.path)
        elif cfg.source == "unisrec":
            raw = load_unisrec(cfg.path)
        else:
            raw = load_table(
                cfg.path,
                items_path=cfg.items_path,
                user_col=cfg.user_col,
                item_col=cfg.item_col,
                time_col=cfg.time_col,
                text_cols=cfg.text_cols,
            )
    catalog, users, seqs = raw
    logger.info("loaded %d users, %d items, %d interactions", len(users), len(catalog), sum(map(len, seqs)))
    return clean(catalog, users, seqs, kcore_k=cfg.kcore, max_seq_len=cfg.max_seq_len)
