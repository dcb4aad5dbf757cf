"""Validation NDCG@10 of a trained run by number of candidates and fusion weight (what choosing
eval.n_candidates on validation would see).

The LM scores every one of the first N = max(--ns) candidates of the run's retriever (as fitted without the
validation targets) exactly, once; the first n candidates of the retriever's order are a prefix of its first N
(single models and retrieval.source=pool alike), the LM's log-probability of an item does not depend on the other
candidates under exact tree scoring, and the log-softmax of the retriever's scores only shifts by a constant per
user, so each (n, weight) is the fused order of the N restricted to the first n.

    python -m bench.n_candidates_valid --run /tmp/pool/sci-pool --ns 50,100,200,400 \\
        --out bench/results/cpu_pool_n_candidates_scientific.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from bench.common import save
from genrec.data import leave_one_out
from genrec.evaluation import fused_order, lm_candidate_scores, validation_collab
from genrec.evaluation.metrics import user_metrics
from genrec.recommender import Recommender
from genrec.retrieval import log_softmax
from genrec.run import RunDir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--ns", default="50,100,200,400")
    p.add_argument("--users", type=int, default=0, help="first N validation users (0: all)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    run = RunDir(a.run)
    rec = Recommender.load(run, search="exact")
    cfg = rec.cfg
    ns = sorted(int(n) for n in a.ns.split(","))
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_candidates=max(ns)))
    valid = leave_one_out(rec.data, "valid")
    valid = valid[: a.users] if a.users else valid
    started = time.time()
    serving, rec.collab = rec.collab, validation_collab(rec)
    histories = [list(ex.history) for ex in valid]
    order, _ = rec.collab.search(histories, max(ns), exclude=histories)
    items, lm = lm_candidate_scores(rec, valid, cfg)
    coll = rec.collab.scores_of(histories, items)
    # an alternative fused score, for comparison: the sum of every pool member's log-softmax over the candidates
    members = getattr(rec.collab, "members", [])
    per_member = [m.scores_of(histories, items) for m in members]
    summed = [sum(log_softmax(pm[u]) for pm in per_member) for u in range(len(items))] if members else None
    rec.collab = serving
    recall: dict[str, float] = {}
    grids: dict[str, dict[str, dict[str, float]]] = {"scorer": {}, "members_summed": {}}
    for n in ns:
        firsts = [set(row[:n].tolist()) for row in order]
        recall[str(n)] = round(
            float(np.mean([ex.target in f for ex, f in zip(valid, firsts, strict=True)])), 4
        )
        for name, fused_with in (("scorer", coll), ("members_summed", summed)):
            if fused_with is None:
                continue
            grid = grids[name].setdefault(str(n), {})
            for w in cfg.retrieval.fusion_grid:
                ndcg = []
                for its, s, c, f, ex in zip(items, lm, fused_with, firsts, valid, strict=True):
                    keep = [j for j, i in enumerate(its) if i in f]
                    # the log-softmax over the n kept is a per-user shift of the N's: the same order
                    top = fused_order([its[j] for j in keep], s[keep], np.asarray(c)[keep], w)[:10]
                    ndcg.append(user_metrics(top, ex.target, [10])["ndcg@10"])
                grid[f"{w:g}"] = round(float(np.mean(ndcg)), 4)
            best = max(grid, key=lambda w: grid[w])
            print(f"{name} n={n}: recall {recall[str(n)]}, best w {best} -> {grid[best]}", flush=True)
    save(
        a.out,
        {
            "run": a.run,
            "candidates": rec.collab.label if rec.collab else "text",
            "fused_score": rec.collab.score_kind if rec.collab else None,
            "users": len(valid),
            "valid_recall": recall,
            "valid_ndcg@10": grids["scorer"],
            "valid_ndcg@10_members_summed": grids["members_summed"],
            "seconds": round(time.time() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
