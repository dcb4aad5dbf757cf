"""The steps a run goes through before training: prepare the data, embed items, build IDs; and the collaborative
retriever that `genrec train` fits beside the language model.

Each step reads and writes only the run directory, so any step can be re-run on its own.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from genrec.config import RunConfig
from genrec.data import Example, Interactions, leave_one_out, load_dataset, without_items
from genrec.errors import GenrecError
from genrec.ids import ItemIds, atomic_ids, semantic_ids, with_cold_items
from genrec.retrieval import (
    COLLABORATIVE_RETRIEVERS,
    VALIDATION_DIR,
    CollaborativeRetriever,
    PooledRetriever,
    Retriever,
    TextEncoder,
    TextScores,
    collaborative_embeddings,
    collaborative_kind,
    fit_collaborative,
)
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
    """Fit the collaborative retriever retrieval.source needs (None for `text`; for `auto` and `pool`, each of
    retrieval.auto_models, keeping the best on validation: `select_collaborative`; `pool` pools them all and fuses
    that one's score) on the items before each user's test item, save it in runs/<name>/retriever/ (and the Markov
    chain and item-kNN fitted without the validation targets in retriever/valid/, for the choices made on
    validation) and record it in run.json (`retrieval`), with the validation recall of the candidates of each
    model and of the pool (`candidate_recall`)."""
    r = cfg.retrieval
    if r.source == "text":
        return None
    several = r.source in ("auto", "pool")
    kinds = list(r.auto_models) if several else [collaborative_kind(r.source, r.collaborative)]
    started = time.time()
    data = without_items(run.load_data(), run.cold_items(cfg))
    if run.retriever_dir.exists():  # models of an earlier training would be taken for this one's
        shutil.rmtree(run.retriever_dir)
    on_valid: dict[str, CollaborativeRetriever] = {}
    seconds: dict[str, float] = {}
    for kind in kinds:
        assert kind is not None
        t0 = time.time()
        model = fit_collaborative(
            data, kind, sasrec_epochs=cfg.eval.sasrec_epochs, seed=cfg.train.seed, progress=progress
        )
        model.save(run.retriever_dir)
        on_valid[kind] = model
        if kind != "sasrec":  # SASRec never trains on the validation items: its test model serves both
            on_valid[kind] = fit_collaborative(
                data, kind, split="valid", sasrec_epochs=0, seed=cfg.train.seed
            )
            on_valid[kind].save(run.retriever_dir / VALIDATION_DIR)
        seconds[kind] = round(time.time() - t0, 1)
        logger.info("collaborative retriever %s trained in %.1f s", kind, seconds[kind])
    info: dict[str, object] = {"source": r.source, "fitted": kinds}
    valid = leave_one_out(data, "valid")
    # each model ranks the validation users once: its first 10 choose the model, its first n give its recall
    ranked = validation_rankings(on_valid, valid, max(10, cfg.eval.n_candidates), progress=progress)
    if several:
        selection = select_collaborative(valid, ranked, users=r.tune_users)
        info["selection"] = {**selection, "fit_seconds": seconds}
        kind = str(selection["chosen"])
    else:
        kind = str(kinds[0])
    info.update(
        collaborative=kind,
        file=str((run.retriever_dir / COLLABORATIVE_RETRIEVERS[kind].file).relative_to(run.path)),
        seconds=round(time.time() - started, 1),
    )
    if "sasrec" in kinds:
        info.update(
            sasrec_epochs=cfg.eval.sasrec_epochs,
            seed=cfg.train.seed,
            window=getattr(on_valid["sasrec"], "window", None),
        )
    info["candidate_recall"] = candidate_recall(
        run, cfg, valid, on_valid, ranked, scorer=kind, progress=progress
    )
    run.update_meta(retrieval=info)  # a fusion weight chosen for an earlier retriever no longer holds
    return info


def validation_rankings(
    models: dict[str, CollaborativeRetriever], valid: Sequence[Example], k: int, *, progress: bool = True
) -> dict[str, np.ndarray]:
    """Each model's first `k` items for every validation user (a model's first n of them are what it retrieves
    for n <= k)."""
    histories = [list(ex.history) for ex in valid]
    return {
        kind: model.search(histories, k)[0]
        for kind, model in tqdm(
            models.items(), desc="validation rankings", unit="model", disable=not progress
        )
    }


def candidate_recall(
    run: RunDir,
    cfg: RunConfig,
    valid: Sequence[Example],
    on_valid: dict[str, CollaborativeRetriever],
    ranked: dict[str, np.ndarray],
    *,
    scorer: str,
    progress: bool = True,
) -> dict[str, object]:
    """The share of validation users whose item is among the eval.n_candidates candidates of each model alone
    (fitted without the validation targets; `ranked`, `validation_rankings`), of the text retriever, and of the
    pool (retrieval.source=pool): the ceiling of genrec's recall with those candidates, recorded in run.json and
    the eval report for every choice, not only the one made. All validation users."""
    n = cfg.eval.n_candidates
    more: dict[str, CollaborativeRetriever] = {}
    if run.embeddings_file.is_file():
        more["text"] = TextScores(Retriever(run.load_embeddings()))
    if cfg.retrieval.source == "pool":
        members = [on_valid[k] for k in cfg.retrieval.auto_models]
        if cfg.retrieval.pool_text and "text" in more:
            members.append(more["text"])
        more["pool"] = PooledRetriever(members, scorer=on_valid[scorer])
    ranked = {
        **{k: v[:, :n] for k, v in ranked.items()},
        **validation_rankings(more, valid, n, progress=False),
    }
    targets = np.asarray([ex.target for ex in valid])
    recall = {kind: float(np.mean((items == targets[:, None]).any(axis=1))) for kind, items in ranked.items()}
    logger.info("validation recall of %d candidates: %s", n, recall)
    return {"n_candidates": n, "users": len(valid), "recall": recall}


def select_collaborative(
    valid: Sequence[Example], ranked: dict[str, np.ndarray], *, users: int
) -> dict[str, object]:
    """retrieval.source=auto (and pool, for the score it fuses): each model alone (fitted without the validation
    targets; `ranked`, `validation_rankings`) ranks the whole catalogue minus each of the first `users` validation
    users' items (0: all); the best NDCG@10 wins, ties to the earlier model. What it returns is recorded in
    run.json and the eval report."""
    from genrec.evaluation.metrics import user_metrics

    valid = valid[:users] if users else valid
    ndcg = {
        kind: float(
            np.mean(
                [
                    user_metrics(row[:10].tolist(), ex.target, [10])["ndcg@10"]
                    for row, ex in zip(items[: len(valid)], valid, strict=True)
                ]
            )
        )
        for kind, items in ranked.items()
    }
    chosen = max(ranked, key=lambda k: ndcg[k])  # max keeps the first of equals
    logger.info("collaborative model chosen on validation: %s (NDCG@10 alone: %s)", chosen, ndcg)
    return {
        "chosen": chosen,
        "chosen_by": "validation ndcg@10, each model alone",
        "users": len(valid),
        "valid_ndcg@10": ndcg,
    }
