"""Candidate recall on the validation split: each collaborative model alone, the text retriever, and their pools.

The share of validation users whose item is among the first n candidates (n of --ns) is the ceiling of genrec's
recall with those candidates. The Markov chain and item-kNN are fitted without the validation targets (as
`genrec train` fits retriever/valid/); SASRec, when --sasrec-run names a trained run, is that run's retriever
(it never trains on the validation items). Pools: retrieval.source=pool's (genrec.retrieval.PooledRetriever)
over the collaborative models, and over them and the text retriever (retrieval.pool_text). No LM is involved.

    python -m bench.pool_recall -c amazon-scientific-atomic.yaml --models markov,itemknn \\
        --out bench/results/cpu_pool_recall_scientific.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save
from genrec.config import load_config, recipe_path
from genrec.data import leave_one_out, load_dataset
from genrec.pipeline import item_embeddings
from genrec.retrieval import (
    CollaborativeRetriever,
    PooledRetriever,
    Retriever,
    TextScores,
    fit_collaborative,
    load_collaborative,
)


def recall_at(
    model: CollaborativeRetriever, histories: list[list[int]], targets: np.ndarray, ns: list[int]
) -> list[float]:
    """Recall of the first n candidates for each n (one search of the largest)."""
    items, _ = model.search(histories, max(ns))
    hit_at = np.where(items == targets[:, None], np.arange(items.shape[1])[None, :], items.shape[1]).min(
        axis=1
    )
    return [round(float(np.mean(hit_at < n)), 4) for n in ns]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="recipe (its data section is used)")
    p.add_argument("--models", default="markov,itemknn", help="collaborative models fitted here")
    p.add_argument(
        "--sasrec-run", default=None, help="a trained run whose retriever/sasrec.pt joins the models"
    )
    p.add_argument("--ns", default="50,100,200,400")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    cfg = load_config(recipe_path(a.config))
    ns = [int(n) for n in a.ns.split(",")]
    data = load_dataset(cfg.data)
    valid = leave_one_out(data, "valid")
    histories = [list(ex.history) for ex in valid]
    targets = np.asarray([ex.target for ex in valid])
    models: dict[str, CollaborativeRetriever] = {}
    seconds: dict[str, float] = {}
    for kind in a.models.split(","):
        t = time.time()
        models[kind] = fit_collaborative(data, kind, split="valid", sasrec_epochs=0, seed=cfg.train.seed)
        seconds[kind] = round(time.time() - t, 1)
    if a.sasrec_run:
        models["sasrec"] = load_collaborative(Path(a.sasrec_run) / "retriever", "sasrec")
    collab = list(models.values())
    emb, source = item_embeddings(data, cfg)
    models["text"] = TextScores(Retriever(emb))
    models["pool"] = PooledRetriever(collab, scorer=collab[0])
    models["pool+text"] = PooledRetriever([*collab, models["text"]], scorer=collab[0])
    recall: dict[str, Any] = {}
    for kind, model in models.items():
        t = time.time()
        recall[kind] = recall_at(model, histories, targets, ns)
        print(kind, recall[kind], f"{time.time() - t:.1f} s", flush=True)
    save(
        a.out,
        {
            "recipe": a.config,
            "users": len(valid),
            "items": len(data.catalog),
            "text_retriever": source,
            "ns": ns,
            "valid_recall": recall,
            "fit_seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
