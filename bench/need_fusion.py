"""Does fusing the text retriever's score of a stated need rescue the need for a trained run? A probe for issue 25:
with `model.id_init: items` the LM no longer reads a need in words (BENCHMARKS.md), while the retriever on the
need's text alone ranks well. Here each need-protocol user (the test or validation item's derived need, as `genrec
evaluate --protocol need` makes it) is ranked by the run's LM given history + need over the whole catalogue, and
each of the LM's first 1,000 items' score becomes the LM's log-probability + w x the log-softmax of the need's cosine with the item's
embedding (genrec.retrieval.fuse, as the collaborative score is fused). The weight is chosen on the validation
users; the test users report it against the LM alone (w = 0) and the retriever alone, paired user by user.

    python -m bench.need_fusion --run runs/sm-demo-s1 --users 300 --out bench/results/cpu_need_fusion_demo_seed1.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save
from genrec.data.catalog import leave_one_out
from genrec.evaluation import need_queries
from genrec.evaluation.metrics import ci_half_width, user_metrics
from genrec.recommender import Recommender
from genrec.retrieval import fuse
from genrec.run import RunDir

GRID = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
TOP = 1000
"""The LM's first TOP items (the most a request may ask for) are fused; the retriever alone ranks every unseen item."""


def ndcg_by_weight(rec: Recommender, split: str, users: int) -> dict[str, np.ndarray]:
    """Each user's NDCG@10 at each fusion weight of GRID (keyed `f"{w:g}"`) and for the retriever alone."""
    cfg = rec.cfg
    examples = leave_one_out(rec.data, split)[:users]
    needs = need_queries(rec.data, examples, cfg)
    options = cfg.ranking.with_(n_items=min(TOP, len(rec.catalog)), candidates="all")
    rec.text_weight = 0.0  # the LM's own order; the probe fuses the text itself
    ranked = []
    for lo in range(0, len(examples), 16):
        part = examples[lo : lo + 16]
        ranked += rec.rank_histories([ex.history for ex in part], options, queries=needs[lo : lo + 16])
    text = rec.encode_text(needs) @ rec.retriever.embeddings.T  # each need's cosine with every item
    out: dict[str, list[float]] = {f"{w:g}": [] for w in GRID}
    out["retriever_need"] = []
    for ex, recs, sims in zip(examples, ranked, text, strict=True):
        items = np.array([r.item for r in recs])
        lm = np.array([r.score for r in recs])
        for w in GRID:
            order = items[np.argsort(-fuse(lm, sims[items], w), kind="stable")][:10]
            out[f"{w:g}"].append(user_metrics(order.tolist(), ex.target, [10])["ndcg@10"])
        unseen = np.setdiff1d(np.arange(len(sims)), ex.history)
        alone = unseen[np.argsort(-sims[unseen], kind="stable")][:10]
        out["retriever_need"].append(user_metrics(alone.tolist(), ex.target, [10])["ndcg@10"])
    return {k: np.array(v) for k, v in out.items()}


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = a - b
    mean, half = float(d.mean()), ci_half_width(d)
    return {"diff": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="A trained run with text item embeddings.")
    ap.add_argument("--users", type=int, default=300, help="First N users of each split.")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rec = Recommender.load(RunDir(args.run))
    valid = ndcg_by_weight(rec, "valid", args.users)
    best = max(GRID, key=lambda w: (float(valid[f"{w:g}"].mean()), -w))
    test = ndcg_by_weight(rec, "test", args.users)
    chosen = test[f"{best:g}"]
    result: dict[str, Any] = {
        "run": args.run,
        "users": args.users,
        "grid": GRID,
        "valid_ndcg@10": {k: round(float(v.mean()), 4) for k, v in valid.items()},
        "weight_chosen_on_valid": best,
        "test_ndcg@10": {k: round(float(v.mean()), 4) for k, v in test.items()},
        "test_fused_minus_lm_alone": paired(chosen, test["0"]),
        "test_fused_minus_retriever_need": paired(chosen, test["retriever_need"]),
    }
    save(str(args.out), result)


if __name__ == "__main__":
    main()
