"""The steps a run goes through before training: prepare the data, embed items, build IDs; and the collaborative
retriever that `genrec train` fits beside the language model.

Each step reads and writes only the run directory, so any step can be re-run on its own.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from genrec.config import RunConfig
from genrec.data import Interactions, load_dataset, without_items
from genrec.errors import GenrecError
from genrec.ids import ItemIds, atomic_ids, semantic_ids, with_cold_items
from genrec.retrieval import TextEncoder, collaborative_embeddings, collaborative_kind, fit_collaborative
from genrec.run import RunDir

logger = logging.getLogger(__name__)


def prepare(run: RunDir, cfg: RunConfig) -> Interactions:
    """Load and clean the data; write catalog.parquet, interactions.parquet and config.yaml."""
    started = time.time()
    data = load_dataset(cfg.data)
    run.save_config(cfg)
    run.save_data(data)
    lengths = [len(s) for s in data.sequences]
    run.update_meta(
        data={
            "users": len(data),
            "items": len(data.catalog),
            "interactions": data.n_interactions,
            "mean_length": round(float(np.mean(lengths)), 2),
            "has_text": data.catalog.has_text,
            "seconds": round(time.time() - started, 1),
        }
    )
    return data


def item_embeddings(data: Interactions, cfg: RunConfig) -> tuple[np.ndarray, str]:
    """Text embeddings when the catalogue has text (or ids.embedding=text), else collaborative."""
    source = cfg.ids.embedding
    if source == "auto":
        source = "text" if data.catalog.has_text else "collaborative"
    if source == "text":
        if not data.catalog.has_text:
            logger.warning("ids.embedding=text but most items have no text; embeddings will be poor")
        encoder = TextEncoder(cfg.ids.encoder)
        texts = [
            t or title or item
            for t, title, item in zip(
                data.catalog.texts, data.catalog.titles, data.catalog.item_ids, strict=True
            )
        ]
        return encoder.encode(texts, progress=True), f"text:{cfg.ids.encoder}"
    return collaborative_embeddings(data, dim=cfg.ids.collaborative_dim, seed=cfg.ids.seed), "collaborative"


def build_ids(run: RunDir, cfg: RunConfig) -> ItemIds:
    """Embed items and assign IDs; write item_embeddings.npy, item_ids.json, codebooks.npz."""
    data = run.load_data()
    cold = run.cold_items(cfg)
    if cold:  # held-out items get their IDs from their text alone, as items added after training would
        data = without_items(data, cold)
    emb, source = item_embeddings(data, cfg)
    if cold and not source.startswith("text"):
        raise GenrecError(
            "data.cold_items needs item text: held-out items get their IDs from their text, and collaborative "
            "embeddings would be made from their interactions (set ids.embedding=text on data with item text)"
        )
    np.save(run.embeddings_file, emb)
    if cfg.ids.scheme == "atomic":
        ids = atomic_ids(len(data.catalog))
    else:
        warm = sorted(set(range(len(data.catalog))) - set(cold))
        ids = semantic_ids(
            emb[warm],
            levels=cfg.ids.levels,
            codes=cfg.ids.codes,
            collision_headroom=cfg.ids.collision_headroom,
            seed=cfg.ids.seed,
            spread_last=cfg.ids.spread_last,
        )
        if cold:
            ids = with_cold_items(ids, emb, warm, cold)
            logger.info("semantic IDs: %d held-out items assigned by the codebooks", len(cold))
        ids.input_items = len(data.catalog) if cfg.ids.input_tokens else 0
    ids.save(run.path, data.catalog.item_ids)
    run.save_config(cfg)
    run.update_meta(
        ids={
            "scheme": ids.scheme,
            "embedding": source,
            "depth": ids.depth,
            "level_sizes": ids.level_sizes,
            "tokens": len(ids.vocabulary()),
            "input_tokens": ids.input_items,
        }
    )
    return ids


def train_retriever(run: RunDir, cfg: RunConfig, *, progress: bool = True) -> dict[str, object] | None:
    """Fit the collaborative retriever retrieval.source needs (None for `text`) on the items before each user's
    test item, save it in runs/<name>/retriever/ and record it in run.json (`retrieval`)."""
    kind = collaborative_kind(cfg.retrieval.source, cfg.retrieval.collaborative)
    if kind is None:
        return None
    started = time.time()
    model = fit_collaborative(
        without_items(run.load_data(), run.cold_items(cfg)),
        kind,
        sasrec_epochs=cfg.eval.sasrec_epochs,
        seed=cfg.train.seed,
        progress=progress,
    )
    path = model.save(run.retriever_dir)
    info: dict[str, object] = {
        "source": cfg.retrieval.source,
        "collaborative": kind,
        "file": str(path.relative_to(run.path)),
        "seconds": round(time.time() - started, 1),
    }
    if kind == "sasrec":
        info.update(
            sasrec_epochs=cfg.eval.sasrec_epochs, seed=cfg.train.seed, window=getattr(model, "window", None)
        )
    run.update_meta(retrieval=info)  # a fusion weight chosen for an earlier retriever no longer holds
    logger.info("collaborative retriever %s trained in %.1f s: %s", kind, time.time() - started, path)
    return info
