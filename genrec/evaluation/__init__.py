"""Offline evaluation: chronological leave-one-out, full ranking, baselines on the same split.

Metrics per user (Recall@K = hit@K with one target, NDCG@K, MRR over the returned list), then
validity (every returned item real, unseen, distinct), catalogue coverage and novelty. Writes
eval.json, per-user results, report.md and PNG plots into the run directory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from genrec.config import RankingOptions, RunConfig
from genrec.data import Example, Interactions, leave_one_out, popularity, without_items
from genrec.data.needs import derive_need
from genrec.errors import GenrecError, stopped_by
from genrec.evaluation.metrics import ci_half_width, intra_list_diversity, user_metrics, validity
from genrec.prep import ranked_batches
from genrec.run import RunDir, atomic_write_text, with_chosen_candidates

logger = logging.getLogger(__name__)


def summarize(
    name: str,
    lists: list[list[int]],
    examples: Sequence[Example],
    *,
    ks: Sequence[int],
    n_items: int,
    item_pop: np.ndarray,
    n_users_train: int,
    embeddings: np.ndarray | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    per_user = [user_metrics(lst, ex.target, ks) for lst, ex in zip(lists, examples, strict=True)]
    summary = {k: float(np.mean([u[k] for u in per_user])) for k in per_user[0]}
    summary["validity"] = float(
        np.mean([validity(lst, ex.history, n_items) for lst, ex in zip(lists, examples, strict=True)])
    )
    kmax = max(ks)
    top = [lst[:kmax] for lst in lists]
    summary[f"coverage@{kmax}"] = len({i for lst in top for i in lst}) / n_items
    prob = (item_pop + 1) / (n_users_train + n_items)
    summary[f"novelty@{kmax}"] = (
        float(np.mean([-np.log2(prob[i]) for lst in top for i in lst])) if any(top) else 0.0
    )
    head = set(np.argsort(-item_pop, kind="stable")[: max(1, n_items // 5)].tolist())  # top 20% by popularity
    recs = [i for lst in top for i in lst]
    summary[f"tail_share@{kmax}"] = float(np.mean([i not in head for i in recs])) if recs else 0.0
    if embeddings is not None:
        summary[f"diversity@{kmax}"] = intra_list_diversity(top, embeddings)
    summary["full_lists"] = float(np.mean([len(lst) >= kmax for lst in lists]))
    logger.info("%s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return summary, per_user


def paired_differences(
    per_user: dict[str, list[dict[str, float]]], metrics: Sequence[str], *, reference: str = "genrec"
) -> dict[str, dict[str, dict[str, float]]]:
    """`reference` against every other method on the same users: per metric, the mean of the per-user
    differences (reference minus method) and its 95% interval, mean ± 1.96 standard errors of those
    differences (paired: each user's two results are compared, which removes the spread between users)."""
    ref = per_user[reference]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in per_user.items():
        if name == reference:
            continue
        out[name] = {}
        for m in metrics:
            d = np.array([a[m] - b[m] for a, b in zip(ref, rows, strict=True)], dtype=np.float64)
            mean, half = float(d.mean()), ci_half_width(d)
            out[name][m] = {"diff": mean, "low": mean - half, "high": mean + half}
    return out


def compared_metrics(ks: Sequence[int]) -> list[str]:
    """The metrics the report compares pairwise: Recall and NDCG at 10 (else the middle cut-off), and MRR."""
    k = 10 if 10 in ks else sorted(ks)[len(ks) // 2]
    return [f"recall@{k}", f"ndcg@{k}", "mrr"]


def popularity_lists(examples: Sequence[Example], counts: np.ndarray, k: int) -> list[list[int]]:
    """Most interacted-with items (before the split's targets) that the user has not seen."""
    order = np.argsort(-counts, kind="stable")
    out = []
    for ex in examples:
        seen = set(ex.history)
        lst: list[int] = []
        for i in order:
            if int(i) not in seen:
                lst.append(int(i))
                if len(lst) == k:
                    break
        out.append(lst)
    return out


def baseline_lists(
    rec: Any,
    examples: list[Example],
    cfg: RunConfig,
    counts: np.ndarray,
    *,
    progress: bool,
    parts: EvalParts | None = None,
    key: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
    data: Interactions | None = None,
) -> dict[str, list[list[int]]]:
    """Each baseline of `names` (default eval.baselines), trained on `data` (default the run's); with `parts`,
    each kept there as it finishes (and taken from there when an interrupted evaluation already finished it
    with the same inputs: `key` plus the baseline's own)."""
    from genrec import baselines

    k, split, out = max(cfg.eval.ks), cfg.eval.split, {}
    data = data if data is not None else rec.data

    def compute(name: str, key: dict[str, Any] | None = None) -> list[list[int]]:
        logger.info("baseline %s", name)
        if name == "popularity":
            return popularity_lists(examples, counts, k)
        if name == "itemknn":
            return baselines.itemknn_lists(data, examples, split=split, k=k)
        if name == "markov":
            return baselines.markov_lists(data, examples, split=split, k=k)
        if name == "retriever":
            return baselines.retriever_lists(rec.retriever, examples, k=k)
        kept = sasrec_from_retriever(rec, examples, cfg, k=k)
        if kept is not None:
            return kept
        sas = baselines.SASRecConfig(epochs=cfg.eval.sasrec_epochs, seed=cfg.train.seed)
        state = parts.folder / "sasrec.state.pt" if parts is not None and key is not None else None
        return baselines.sasrec_lists(
            data,
            examples,
            split=split,
            k=k,
            cfg=sas,
            progress=progress,
            checkpoint=state,  # its training state after every epoch: an interruption loses one epoch
            checkpoint_key=json.dumps(key, sort_keys=True) if state else "",
        )

    for name in cfg.eval.baselines if names is None else names:
        if parts is None:
            out[name] = compute(name)
            continue
        own: dict[str, Any] = {"method": name, "k": k}
        if name == "retriever":
            own["embeddings"] = files_stamp(rec.run.embeddings_file)
        if name == "sasrec":
            own.update(epochs=cfg.eval.sasrec_epochs, seed=cfg.train.seed)
        full = {**(key or {}), **own}
        out[name] = parts.method(name, full, functools.partial(compute, name, full))
    return out


def sasrec_from_retriever(
    rec: Any, examples: Sequence[Example], cfg: RunConfig, *, k: int
) -> list[list[int]] | None:
    """The SASRec baseline's lists from the run's SASRec retriever, where that is the model the baseline would
    train (None otherwise): `SASRecRetriever.fit` is the baseline's training for the test split (same data, epochs,
    seed and epoch selection) when the evaluation's histories give it the same window. Saves training it twice."""
    from genrec.baselines import SASRecConfig, sasrec_lists, sasrec_window
    from genrec.retrieval import SASRecRetriever, load_collaborative

    if cfg.eval.split != "test":
        return None
    model = getattr(rec, "collab", None)
    if not isinstance(model, SASRecRetriever):  # retrieval.source=auto fits it and may choose another
        run = getattr(rec, "run", None)
        if run is None or "sasrec" not in run.meta().get("retrieval", {}).get("fitted", ()):
            return None
        try:
            model = load_collaborative(run.retriever_dir, "sasrec")
        except FileNotFoundError:
            return None
    assert isinstance(model, SASRecRetriever)
    info = rec.run.meta().get("retrieval", {})
    if (info.get("sasrec_epochs"), info.get("seed")) != (cfg.eval.sasrec_epochs, cfg.train.seed):
        return None
    sas = SASRecConfig()
    held = [s[:-2] for s in rec.data.sequences if len(s) >= 3][: sas.valid_users or None]  # as fit_sasrec's
    window = sasrec_window(sas.max_len, held, [ex.history for ex in examples])
    if window != model.window:
        return None
    logger.info(
        "baseline sasrec: ranked by the run's SASRec retriever (%s), the same training", rec.run.retriever_dir
    )
    return sasrec_lists(rec.data, examples, split="test", k=k, trained=(model.model, model.window))


def evaluate(
    run: RunDir, cfg: RunConfig, *, rec: Any = None, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Score the model and the baselines on one split; write eval.json, report.md and plots.

    `rec` is the run's loaded Recommender when the caller already has one (it is loaded otherwise).
    Each method's lists are kept in eval_<split>.parts/ as they are made (genrec's in chunks of users) until
    the report is written; `resume` takes what an interrupted evaluation with the same inputs finished
    from there (see EvalParts).
    """
    from genrec.recommender import Recommender

    rec = rec or Recommender.load(run)
    data = rec.data
    protocol = cfg.eval.protocol
    cold = run.cold_items(cfg)
    fusion = fusion_weight_for(rec, cfg, progress=progress)
    text_fusion = text_weight_for(rec, cfg, progress=progress) if protocol == "need" else None
    cfg = with_chosen_candidates(run, cfg)  # as many candidates as the fusion weight was chosen for
    examples = leave_one_out(data, cfg.eval.split)
    if protocol == "cold":  # the users whose held-out item is the one to find
        held_out = set(cold)
        examples = [ex for ex in examples if ex.target in held_out]
        if not examples:
            raise GenrecError(f"eval.protocol=cold: no {cfg.eval.split} user's target is a held-out item")
    if cfg.eval.max_users:
        examples = examples[: cfg.eval.max_users]
    queries = need_queries(data, examples, cfg) if protocol == "need" else None
    ks = sorted(cfg.eval.ks)
    # Baselines learn from what training saw: held-out items' interactions are not in it
    seen_data = without_items(data, cold)
    counts = popularity(seen_data, split=cfg.eval.split)
    common = {
        "ks": ks,
        "n_items": len(data.catalog),
        "item_pop": counts,
        "n_users_train": len(data),
        "embeddings": rec.retriever.embeddings,
    }
    stem = cfg.eval.split if protocol == "standard" else f"{cfg.eval.split}_{protocol}"
    parts = EvalParts(run / f"eval_{stem}.parts", resume=resume)
    key = {
        "genrec_version": _version(),
        "split": cfg.eval.split,
        "examples": examples_digest(examples),
        "data": files_stamp(run.interactions_file, run.catalog_file),
    }
    try:
        genrec, seconds, ranked_by = genrec_lists(
            rec, examples, cfg, parts, key, progress=progress, queries=queries
        )
        lists = {"genrec": genrec}
        if queries is not None:  # the same users, the same model, the history alone: the paired comparison
            lists[HISTORY_ALONE] = genrec_lists(
                rec, examples, cfg, parts, key, progress=progress, name=HISTORY_ALONE
            )[0]
            lists["retriever_need"] = need_retriever_lists(rec, examples, queries, k=max(ks))
        names = [b for b in cfg.eval.baselines if protocol != "cold" or b in COLD_CAPABLE]
        lists.update(
            baseline_lists(
                rec,
                examples,
                cfg,
                counts,
                progress=progress,
                parts=parts,
                key=key,
                names=names,
                data=seen_data,
            )
        )
    except BaseException as e:  # Ctrl-C (the CLI exits quietly on it), out of memory, a failing baseline
        if parts.folder.is_dir():
            why = stopped_by(e)
            logger.warning(
                "evaluation %s; the lists it finished are kept in %s: `genrec evaluate --run %s --resume` (same "
                "split and settings) goes on from them",
                why,
                parts.folder,
                run.path,
            )
        raise
    results, per_user = {}, {}
    for name, lst in lists.items():
        results[name], per_user[name] = summarize(name, lst, examples, **common)  # type: ignore[arg-type]
    shown = rec.builder_for(rec.template_for("need" if queries else None)).template  # what genrec ranked with
    report = {
        "split": cfg.eval.split,
        "stem": stem,
        "protocol": protocol_text(cfg, rec),
        **protocol_fields(cfg, cold, examples),
        "users": len(examples),
        "items": len(data.catalog),
        "beam_width": cfg.eval.beam_width,
        "ranked_by": ranked_by,
        "genrec_seconds": round(seconds, 1),
        "genrec_users_per_s": round(len(examples) / max(seconds, 1e-9), 2),
        "template": shown.name,
        "template_hash": shown.hash,
        "results": results,
        "genrec_vs": paired_differences(per_user, compared_metrics(ks)),
        **({"retrieval": fusion} if fusion is not None and cfg.eval.candidates != "all" else {}),
        **({"text_fusion": text_fusion} if text_fusion is not None else {}),
        **({"rl": run.meta()["rl"]} if "rl" in run.meta() else {}),
        **({"resumed": parts.reused} if parts.reused else {}),
    }
    save_outputs(run, report, examples, lists, per_user)
    parts.remove()
    return report


HISTORY_ALONE = "genrec_history_alone"
"""The need protocol's second genrec list: the same users ranked from their history alone."""
COLD_CAPABLE = ("popularity", "retriever")
"""Baselines that can take part in the cold-items protocol; the others (SASRec, item-kNN, the Markov chain) score
items by their interactions in training, and held-out items have none."""


def need_queries(data: Interactions, examples: Sequence[Example], cfg: RunConfig) -> list[str]:
    """The need protocol's text: each test item's derived need (seeded apart from training's needs)."""
    return [
        derive_need(
            data.catalog,
            ex.target,
            user=ex.user,
            seed=cfg.train.seed + 1,
            title_words=cfg.prompt.need_title_words,
        )
        for ex in examples
    ]


def need_retriever_lists(
    rec: Any, examples: Sequence[Example], queries: Sequence[str], *, k: int
) -> list[list[int]]:
    """The retriever alone on each need's text (no history, no LM), the user's seen items left out."""
    if not rec.text_embeddings:
        return [[] for _ in examples]
    return rec.text_retrieved_many(
        list(queries), n=[k] * len(queries), exclude=[list(ex.history) for ex in examples]
    )


def protocol_fields(cfg: RunConfig, cold: Sequence[int], examples: Sequence[Example]) -> dict[str, Any]:
    """What the report says of its protocol (eval.protocol): the held-out items, the baselines left out and why."""
    protocol = cfg.eval.protocol
    out: dict[str, Any] = {"eval_protocol": protocol}
    if cold:
        out["cold_items"] = len(cold)
    if protocol == "cold":
        out["not_comparable"] = {
            b: "cannot rank items unseen in training (it scores items by their interactions)"
            for b in cfg.eval.baselines
            if b not in COLD_CAPABLE
        }
    if protocol == "need":
        out["need"] = (
            f"each user's test item's need (its category or genres, sometimes its brand, {cfg.prompt.need_title_words} "
            f"words of its title at most, fewer than half of them) given with the history, its text score fused "
            f"(retrieval.text_weight); {HISTORY_ALONE}: the same model on the history alone; retriever_need: the "
            "retriever on the need's text alone"
        )
    return out


def protocol_text(cfg: RunConfig, rec: Any) -> str:
    """The report's protocol line: genrec ranks the whole catalogue, or a retriever's candidates, but every
    method is scored over the whole catalogue (a target outside genrec's candidates counts as not ranked)."""
    base = "chronological leave-one-out; full ranking over the catalogue minus the user's seen items"
    if cfg.eval.candidates == "all":
        return base
    source: str = cfg.retrieval.source if rec.collab is not None else "text"
    if source == "auto":
        source = f"{rec.collab.kind} (retrieval.source=auto)"
    elif source == "pool":
        source = f"{rec.collab.label} (retrieval.source=pool)"
    fused = (
        f", fused with the {rec.collab.score_kind} score"
        if rec.collab is not None and rec.fusion_weight
        else ""
    )
    return (
        f"{base}; genrec ranks the {source} retriever's top-{cfg.eval.n_candidates} candidates{fused} (a target "
        "outside them counts as not ranked)"
    )


def fusion_weight_for(rec: Any, cfg: RunConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """The fusion of the run's collaborative retriever (None without one): the configured weight, the one
    recorded in run.json, or, for `auto` with none recorded, one chosen now (`choose_fusion_weight`)."""
    if rec.collab is None:
        return None
    if cfg.retrieval.fusion_weight != "auto":
        rec.fusion_weight = float(cfg.retrieval.fusion_weight)
        selection = rec.run.meta().get("retrieval", {}).get("selection")
        return {
            "weight": rec.fusion_weight,
            "chosen_by": "retrieval.fusion_weight",
            **retrieval_record(rec),
            **({"selection": selection} if selection else {}),
        }
    if rec.fusion_weight is None:
        return choose_fusion_weight(rec, cfg, progress=progress)
    recorded = rec.run.meta().get("retrieval", {}).get("fusion") or {}
    if recorded.get("weight") == rec.fusion_weight:
        return dict(recorded)
    return {"weight": rec.fusion_weight, **retrieval_record(rec)}  # set on this Recommender, not recorded


def text_weight_for(rec: Any, cfg: RunConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """The fusion of a request's free text (retrieval.text_weight; None where the run's item embeddings are not
    text, so no text can be scored): the configured weight, the one recorded in run.json, or, for `auto` with none
    recorded, one chosen now (`choose_text_weight`)."""
    if not rec.text_embeddings:
        return None
    if cfg.retrieval.text_weight != "auto":
        rec.text_weight = float(cfg.retrieval.text_weight)
        return {"weight": rec.text_weight, "chosen_by": "retrieval.text_weight"}
    if rec.text_weight is None:
        return choose_text_weight(rec, cfg, progress=progress)
    recorded = rec.run.meta().get("retrieval", {}).get("text_fusion") or {}
    if recorded.get("weight") == rec.text_weight:
        return dict(recorded)
    return {"weight": rec.text_weight}  # set on this Recommender, not recorded


def choose_text_weight(rec: Any, cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Choose retrieval.text_weight on the validation split's need protocol: the first retrieval.tune_users
    validation users, each given its validation item's derived need beside the history, are ranked once with the
    text's weight at 0 (the LM's scores, fused with the collaborative ones at their weight), and the text's cosines
    are fused in at each weight of retrieval.text_grid; the weight with the best NDCG@10 is kept (ties: the
    smaller). Sets it on `rec` and records it in run.json (`retrieval.text_fusion`)."""
    if rec.collab is not None and rec.fusion_weight is None:
        fusion_weight_for(
            rec, cfg, progress=progress
        )  # the text's weight is fused over the collaborative one
    r = cfg.retrieval
    valid = leave_one_out(rec.data, "valid")
    valid = valid[: r.tune_users] if r.tune_users else valid
    started = time.time()
    per_user = text_fused_validation_users(rec, valid, cfg, r.text_grid, progress=progress)
    means = {w: float(v.mean()) for w, v in per_user.items()}
    best = max(r.text_grid, key=lambda w: (means[f"{w:g}"], -w))
    info = {
        "weight": float(best),
        "chosen_by": "validation ndcg@10, need protocol",
        "users": len(valid),
        "valid_ndcg@10": {w: round(v, 4) for w, v in means.items()},
        "seconds": round(time.time() - started, 1),
    }
    logger.info(
        "text weight %g (validation NDCG@10 of the need protocol by weight: %s)", best, info["valid_ndcg@10"]
    )
    rec.text_weight = float(best)
    rec.run.update_meta(retrieval={**rec.run.meta().get("retrieval", {}), "text_fusion": info})
    return info


def text_fused_validation_users(
    rec: Any, valid: Sequence[Example], cfg: RunConfig, weights: Sequence[float], *, progress: bool = True
) -> dict[str, np.ndarray]:
    """Each validation example's NDCG@10 (in `valid`'s order) given its validation item's derived need beside the
    history, at each text weight (keyed `f"{w:g}"`). Ranked once, with the text's weight at 0 and the collaborative
    scores of `validation_collab` (a model that never saw these targets); every ranked item is kept (candidates,
    or with candidates=all the LM's first RankingOptions.MAX_ITEMS) and the text's cosines fused at each weight."""
    from genrec.recommender import history_requests
    from genrec.retrieval import fuse

    needs = need_queries(rec.data, valid, cfg)
    options = with_chosen_candidates(rec.run, cfg).ranking.with_(n_items=RankingOptions.MAX_ITEMS)
    serving, saved = rec.collab, rec.text_weight
    if serving is not None:
        rec.collab = validation_collab(rec)
    rec.text_weight = 0.0
    ranked: list[Any] = []
    vectors: list[Any] = []  # each need as `prepare` embedded it (not embedded a second time)
    try:
        with tqdm(total=len(valid), desc="text weight", unit="user", disable=not progress) as bar:
            for s in range(0, len(valid), cfg.eval.batch_size):
                chunk = valid[s : s + cfg.eval.batch_size]
                reqs = history_requests(
                    [ex.history for ex in chunk],
                    options,
                    users=[ex.user for ex in chunk],
                    queries=needs[s : s + cfg.eval.batch_size],
                )
                prepared = rec.prepare(reqs)
                ranked += rec.rank_prepared(reqs, prepared)
                vectors += prepared.text_vectors or [None] * len(reqs)
                bar.update(len(chunk))
    finally:
        rec.collab, rec.text_weight = serving, saved
    out: dict[str, list[float]] = {f"{w:g}": [] for w in weights}
    for ex, recs, vec in zip(valid, ranked, vectors, strict=True):
        items = [x.item for x in recs]
        scores = np.asarray([x.score for x in recs], dtype=np.float64)
        cos = rec.text_cosines(vec, items)
        for w in weights:
            order = np.argsort(-fuse(scores, cos, w), kind="stable")[:10]
            out[f"{w:g}"].append(user_metrics([items[j] for j in order], ex.target, [10])["ndcg@10"])
    return {k: np.asarray(v) for k, v in out.items()}


def retrieval_record(rec: Any) -> dict[str, Any]:
    """What the report and run.json say of the run's candidates: the model whose score is fused (`source`), what
    proposes the candidates (`candidates`: the same model, or a pool's members) and every model's validation
    recall of them (`candidate_recall_by_model`, recorded by `genrec train`)."""
    by_model = rec.run.meta().get("retrieval", {}).get("candidate_recall")
    return {
        "source": rec.collab.score_kind,
        "candidates": rec.collab.label,
        **({"candidate_recall_by_model": by_model} if by_model else {}),
    }


def choose_fusion_weight(rec: Any, cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Choose retrieval.fusion_weight on the validation split: rank the first retrieval.tune_users validation
    users' retrieved candidates once with the LM alone (every candidate's log-probability), fuse them with the
    collaborative scores at each weight of retrieval.fusion_grid, and keep the weight with the best NDCG@10
    (ties: the smaller weight). With retrieval.n_candidates_grid, eval.n_candidates is chosen with it: the LM
    scores the largest number's candidates and each smaller number keeps the first ones of the retriever's order
    (`candidate_prefixes`); ties go to fewer candidates. Sets both on `rec` and records them in run.json
    (`retrieval.fusion`)."""
    r = cfg.retrieval
    valid = leave_one_out(rec.data, "valid")
    valid = valid[: r.tune_users] if r.tune_users else valid
    started = time.time()
    ns = sorted(set(r.n_candidates_grid)) or [cfg.eval.n_candidates]
    per_user, items, prefixes = fused_validation_users(
        rec, valid, cfg, r.fusion_grid, ns=ns, progress=progress
    )
    by_n = {n: {w: float(v.mean()) for w, v in by_w.items()} for n, by_w in per_user.items()}
    n, best = max(
        ((n, w) for n in ns for w in r.fusion_grid),
        key=lambda p: (by_n[str(p[0])][f"{p[1]:g}"], -p[0], -p[1]),
    )
    info = {
        "weight": float(best),
        "chosen_by": "validation ndcg@10",
        **retrieval_record(rec),
        "users": len(valid),
        "n_candidates": n,
        "valid_ndcg@10": by_n[str(n)],
        **(
            {"valid_ndcg@10_by_n_candidates": by_n, "n_candidates_chosen_by": "validation ndcg@10"}
            if len(ns) > 1
            else {}
        ),
        "candidate_recall": float(
            np.mean(
                [
                    ex.target in {its[j] for j in keep}
                    for its, keep, ex in zip(items, prefixes[n], valid, strict=True)
                ]
            )
        ),
        "seconds": round(time.time() - started, 1),
    }
    selection = rec.run.meta().get("retrieval", {}).get("selection")
    if selection:
        info["selection"] = selection  # retrieval.source=auto's choice
    logger.info(
        "fusion weight %g, %d candidates (validation NDCG@10 by candidates and weight: %s)", best, n, by_n
    )
    rec.fusion_weight = float(best)
    rec.run.update_meta(retrieval={**rec.run.meta().get("retrieval", {}), "fusion": info})
    rec.cfg = with_chosen_candidates(rec.run, rec.cfg)
    return info


def candidate_prefixes(
    collab: Any, histories: Sequence[Sequence[int]], items: Sequence[Sequence[int]], ns: Sequence[int]
) -> dict[int, list[np.ndarray]]:
    """For each n of `ns`, the positions in each user's `items` (the first max(ns) candidates, in the LM's order)
    of the retriever's first n: a single model's and a pool's order do not depend on how many are asked for, so
    the first n of the first N are what n would retrieve. One n: every position."""
    if len(ns) == 1:
        return {ns[0]: [np.arange(len(its)) for its in items]}
    order, _ = collab.search(histories, max(ns), exclude=histories)
    rank = [{int(i): k for k, i in enumerate(row) if i >= 0} for row in order]
    at = [np.asarray([rk.get(i, len(rk)) for i in its]) for rk, its in zip(rank, items, strict=True)]
    return {n: [np.flatnonzero(a < n) for a in at] for n in ns}


def fused_validation_users(
    rec: Any,
    valid: Sequence[Example],
    cfg: RunConfig,
    weights: Sequence[float],
    *,
    ns: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, np.ndarray]], list[list[int]], dict[int, list[np.ndarray]]]:
    """Each validation example's NDCG@10 (in `valid`'s order) for each number of candidates n of `ns` (None:
    eval.n_candidates) and each fusion weight (keyed `str(n)`, then `f"{w:g}"`), each example's candidates and, per
    n, the positions of the first n among them (`candidate_prefixes`). The largest number's candidates are ranked
    once with the LM alone (every candidate's log-probability) and fused with the scores of `validation_collab` (a
    model that never saw these targets) at each weight. What retrieval.fusion_weight=auto chooses from (by the
    means), and how the RL stage (genrec.rl) compares models, user by user."""
    ns = list(ns or [cfg.eval.n_candidates])
    widest = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_candidates=max(ns)))
    serving = rec.collab
    rec.collab = validation_collab(rec)  # candidates and scores from a model that never saw these targets
    try:
        items, lm = lm_candidate_scores(rec, valid, widest, progress=progress)
        histories = [list(ex.history) for ex in valid]
        collab = rec.collab.scores_of(histories, items)
        prefixes = candidate_prefixes(rec.collab, histories, items, ns)
    finally:
        rec.collab = serving
    by_n: dict[str, dict[str, np.ndarray]] = {}
    for n in ns:
        by_n[str(n)] = {}
        for w in weights:
            lists = [
                fused_order([its[j] for j in keep], s[keep], c[keep], w)[:10]
                for its, s, c, keep in zip(items, lm, collab, prefixes[n], strict=True)
            ]
            by_n[str(n)][f"{w:g}"] = np.array(
                [user_metrics(lst, ex.target, [10])["ndcg@10"] for lst, ex in zip(lists, valid, strict=True)]
            )
    return by_n, items, prefixes


def validation_collab(rec: Any) -> Any:
    """The collaborative model the validation split's choices use: the run's one fitted without the validation
    targets (retriever/valid/: the Markov chain and item-kNN; for a pool, each member), else the run's own
    (SASRec, which never trains on them; the text retriever; or a retriever set on `rec` by its caller)."""
    from genrec.retrieval import VALIDATION_DIR, for_validation

    return for_validation(rec.collab, rec.run.retriever_dir / VALIDATION_DIR)


def lm_candidate_scores(
    rec: Any, examples: Sequence[Example], cfg: RunConfig, *, progress: bool = True
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Each example's retrieved candidates and the LM's log-probability of each (no fusion), in batches."""
    n, saved = cfg.eval.n_candidates, rec.fusion_weight
    rec.fusion_weight = 0.0  # the LM's own scores of every candidate
    items: list[list[int]] = []
    scores: list[np.ndarray] = []
    try:
        with tqdm(total=len(examples), desc="fusion weight", unit="user", disable=not progress) as bar:
            for s in range(0, len(examples), cfg.eval.batch_size):
                chunk = examples[s : s + cfg.eval.batch_size]
                reqs = history_requests_for(chunk, n)
                for recs in rec.rank_requests(reqs):
                    items.append([x.item for x in recs])
                    scores.append(np.asarray([x.score for x in recs], dtype=np.float64))
                bar.update(len(chunk))
    finally:
        rec.fusion_weight = saved
    return items, scores


def history_requests_for(examples: Sequence[Example], n: int) -> list[Any]:
    """Retriever-mode requests for the examples that return all `n` candidates."""
    from genrec.recommender import history_requests

    return history_requests(
        [ex.history for ex in examples],
        RankingOptions(n_items=n, candidates="retriever", n_candidates=n, beam_width=n),
        users=[ex.user for ex in examples],
    )


def fused_order(items: Sequence[int], lm: np.ndarray, collab: np.ndarray, weight: float) -> list[int]:
    """The items by fused score, best first (genrec.retrieval.fuse)."""
    from genrec.retrieval import fuse

    order = np.argsort(-fuse(lm, collab, weight), kind="stable")
    return [items[j] for j in order]


GENREC_CHUNK_USERS = 1024
"""genrec's ranked lists are kept every this many users (rounded up to whole batches) during an evaluation."""


def genrec_lists(
    rec: Any,
    examples: Sequence[Example],
    cfg: RunConfig,
    parts: EvalParts,
    key: dict[str, Any],
    *,
    progress: bool,
    queries: Sequence[str] | None = None,
    name: str = "genrec",
) -> tuple[list[list[int]], float, dict[str, int]]:
    """genrec's lists for every example, the seconds its ranking took and how requests were ranked (exact
    tree scoring or beam search), in chunks committed to `parts`: a resumed evaluation ranks only the users
    after the last committed chunk, and adds the committed chunks' seconds and counts."""
    e = cfg.eval
    key = {
        **key,
        "method": name,
        "queries": None if queries is None else texts_digest(queries),
        **({"text_weight": rec.text_weight} if queries is not None else {}),
        "model": files_stamp(rec.run.model_dir()),
        "ids": files_stamp(rec.run.ids_file),
        "template_hash": rec.builder.template.hash,
        "engine": f"{type(rec.engine).__name__} on {getattr(rec.engine, 'device', '?')}",  # numerics differ
        "model_config": dataclasses.asdict(cfg.model),
        "eval": {k: v for k, v in dataclasses.asdict(e).items() if k not in _NOT_GENREC},
        **(
            {
                "retriever": files_stamp(rec.run.retriever_dir) if rec.run.retriever_dir.exists() else None,
                "fusion_weight": rec.fusion_weight,
            }
            if rec.collab is not None
            else {}
        ),
    }
    done = parts.chunks(name, key)
    n_chunks = len(done)
    lists = [lst for c in done for lst in c["lists"]]
    seconds = sum(c["seconds"] for c in done)
    ranked_by: Counter[str] = Counter()
    for c in done:
        ranked_by.update(c["ranked_by"])
    per_chunk = -(-GENREC_CHUNK_USERS // e.batch_size) * e.batch_size
    pending: list[list[int]] = []
    started, before = time.time(), Counter(rec.engine.ranked_by)

    def commit() -> None:
        nonlocal started, before, seconds, pending, n_chunks
        now, counts = time.time(), Counter(rec.engine.ranked_by)
        made = {k: v for k, v in (counts - before).items() if v}
        parts.commit_chunk(
            name, n_chunks, key, {"lists": pending, "seconds": now - started, "ranked_by": made}
        )
        n_chunks += 1
        lists.extend(pending)
        seconds += now - started
        ranked_by.update(made)
        started, before, pending = now, counts, []

    desc = f"{name} ranking" + (f" (resumed: {len(lists)} users kept)" if lists else "")
    with tqdm(total=len(examples), initial=len(lists), desc=desc, unit="user", disable=not progress) as bar:
        rest = None if queries is None else queries[len(lists) :]
        for batch in ranked_batches(
            rec, examples[len(lists) :], cfg, bar, workers=e.prep_workers, queries=rest
        ):
            pending.extend(batch)
            if len(pending) >= per_chunk:
                commit()
        if pending:
            commit()
    return lists, seconds, dict(ranked_by)


_NOT_GENREC = ("baselines", "sasrec_epochs", "prep_workers")
"""eval settings that do not change genrec's lists (prep_workers: same output, measured in tests)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genrec")
    except PackageNotFoundError:
        return "unknown"


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples' users, histories and targets: the same split of the same data."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.user, ex.target, list(ex.history)]).encode())
    return digest.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 of a list of texts (the need protocol's queries)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def files_stamp(*paths: Path) -> str:
    """A stamp of files and folders (every file below them): name, size and modification time, hashed.
    Changes when a file is written again (a retrained model, rebuilt IDs), costs no read."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            digest.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class EvalParts:
    """Each method's ranked lists, kept in runs/<name>/eval_<split>.parts/ as evaluate makes them, so that an
    evaluation that dies (Ctrl-C, out of memory, a killed job) goes on with `--resume`: a finished baseline is
    not trained again and genrec's ranking goes on after its last committed chunk. Every file holds the inputs
    that made it (its key: the genrec version, the split's examples, the data, model and ID files' stamps, the
    template hash, the settings); a file whose key differs from this evaluation's is made again, and the log
    says which input changed. Without `resume`, what an interrupted evaluation left is removed first. The
    folder is removed once the report is written."""

    def __init__(self, folder: Path, *, resume: bool) -> None:
        self.folder = folder
        self.reused: list[str] = []
        if folder.exists() and not resume:
            logger.info("%s: left by an interrupted evaluation; removed (--resume would reuse it)", folder)
            shutil.rmtree(folder)

    def _read(self, path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("key") != key:
            old = data.get("key") or {}
            changed = sorted(k for k in {*key, *old} if key.get(k) != old.get(k))
            logger.warning("%s: made with another %s; made again", path, ", ".join(changed))
            return None
        return dict(data)

    def method(
        self, name: str, key: dict[str, Any], compute: Callable[[], list[list[int]]]
    ) -> list[list[int]]:
        """`name`'s lists: kept ones made with `key`, or computed now and kept."""
        path = self.folder / f"{name}.json"
        data = self._read(path, key)
        if data is not None:
            logger.info("%s: lists taken from %s (an interrupted evaluation's)", name, path)
            self.reused.append(name)
            return list(data["lists"])
        lists = compute()
        self._write(path, key, {"lists": lists})
        return lists

    def chunks(self, name: str, key: dict[str, Any]) -> list[dict[str, Any]]:
        """`name`'s committed chunks made with `key`, in order from the first (the rest are dropped)."""
        out: list[dict[str, Any]] = []
        while (data := self._read(self.folder / f"{name}-{len(out):05d}.json", key)) is not None:
            out.append(data)
        if out:
            logger.info(
                "%s: %d users' lists taken from %s", name, sum(len(c["lists"]) for c in out), self.folder
            )
            self.reused.append(name)
        for stale in self.folder.glob(f"{name}-*.json"):  # after a gap or a changed key
            if int(stale.stem.rsplit("-", 1)[1]) >= len(out):
                stale.unlink()
        return out

    def commit_chunk(self, name: str, index: int, key: dict[str, Any], payload: dict[str, Any]) -> None:
        self._write(self.folder / f"{name}-{index:05d}.json", key, payload)

    def _write(self, path: Path, key: dict[str, Any], payload: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, **payload}))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def save_outputs(
    run: RunDir,
    report: dict[str, Any],
    examples: Sequence[Example],
    lists: dict[str, list[list[int]]],
    per_user: dict[str, list[dict[str, float]]],
) -> None:
    split = report.get("stem", report["split"])
    atomic_write_text(run / f"eval_{split}.json", json.dumps(report, indent=2))
    rows = []
    for name in lists:
        for ex, lst, m in zip(examples, lists[name], per_user[name], strict=True):
            rows.append({"method": name, "user": ex.user, "target": ex.target, "ranked": lst, **m})
    pd.DataFrame(rows).to_parquet(run / f"eval_{split}_users.parquet", index=False)
    plots = write_plots(run, report, per_user)
    atomic_write_text(run / f"report_{split}.md", markdown_report(report, plots))


def write_plots(
    run: RunDir, report: dict[str, Any], per_user: dict[str, list[dict[str, float]]] | None = None
) -> list[str]:
    """The metric bars (with 95% intervals of each mean when `per_user` is given), coverage and long tail,
    and the training loss curve; returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split, results = report.get("stem", report["split"]), report["results"]
    metrics = [m for m in next(iter(results.values())) if m.startswith(("recall@", "ndcg@")) or m == "mrr"]
    fig, ax = plt.subplots(figsize=(10.5, 4))
    width = 0.8 / len(results)
    for j, (name, res) in enumerate(results.items()):
        err = [ci_half_width([u[m] for u in per_user[name]]) for m in metrics] if per_user else None
        ax.bar(
            np.arange(len(metrics)) + j * width,
            [res[m] for m in metrics],
            width,
            yerr=err,
            capsize=2,
            label=name,
        )
    ax.set_xticks(np.arange(len(metrics)) + width * (len(results) - 1) / 2, metrics)
    bars = " ± 95% interval" if per_user else ""
    ax.set_title(f"{split}: {report['users']} users, {report['items']} items (full ranking){bars}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    out = [f"eval_{split}_metrics.png"]
    fig.savefig(run / out[0], dpi=110)
    plt.close(fig)
    tail_key = next(m for m in next(iter(results.values())) if m.startswith("tail_share@"))
    cov_key = next(m for m in next(iter(results.values())) if m.startswith("coverage@"))
    fig, ax = plt.subplots(figsize=(10, 3.5))
    names = list(results)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n][cov_key] for n in names], 0.4, label=f"catalogue {cov_key}")
    ax.bar(
        x + 0.2, [results[n][tail_key] for n in names], 0.4, label=f"long-tail {tail_key} (outside top 20%)"
    )
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("coverage and long tail")
    fig.tight_layout()
    out.append(f"eval_{split}_longtail.png")
    fig.savefig(run / out[-1], dpi=110)
    plt.close(fig)
    if run.train_log_file.is_file():
        logs = [json.loads(line) for line in run.train_log_file.read_text().splitlines() if line.strip()]
        pts = [(r["step"], r["loss"]) for r in logs if "loss" in r]
        if pts:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(*zip(*pts, strict=True))
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (ID tokens)")
            fig.tight_layout()
            fig.savefig(run / "train_loss.png", dpi=110)
            plt.close(fig)
            out.append("train_loss.png")
    return out


def ranking_text(report: dict[str, Any]) -> str:
    """How genrec's lists were ranked: beam search of the report's width, exact tree scoring, or both."""
    by = report.get("ranked_by") or {"beam": report["users"]}
    beam = f"beam search (width {report['beam_width']})"
    if set(by) == {"beam"}:
        return f"ranked by {beam}"
    if set(by) == {"exact"}:
        return f"ranked exactly (tree scoring; top {report['beam_width']})"
    return f"ranked exactly for {by.get('exact', 0)} users and by {beam} for {by.get('beam', 0)}"


def markdown_report(report: dict[str, Any], plots: list[str]) -> str:
    results = report["results"]
    cols = list(next(iter(results.values())))
    lines = [
        f"# genrec evaluation — {report['split']} split",
        "",
        f"{report['protocol']}. {report['users']} users, {report['items']} items, {ranking_text(report)}, "
        f"template `{report['template']}` ({report['template_hash']}).",
        f"genrec ranked {report['genrec_users_per_s']} users/s.",
        *(
            [
                f"Resumed (`--resume`): lists of {', '.join(report['resumed'])} were kept from an interrupted "
                "evaluation with the same inputs (the same model, data, template and settings)."
            ]
            if report.get("resumed")
            else []
        ),
        *retrieval_text(report.get("retrieval")),
        *text_fusion_text(report.get("text_fusion")),
        *rl_text(report.get("rl")),
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{res[c]:.4f}" for c in cols) + " |" for name, res in results.items()
    ]
    lines += paired_table(report.get("genrec_vs") or {}, report["users"])
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def retrieval_text(fusion: dict[str, Any] | None) -> list[str]:
    """The report's lines on the collaborative retriever: what retrieval.source=auto chose and on what, and the
    fusion weight and how it was chosen (nothing without one)."""
    if not fusion:
        return []
    lines = []
    sel = fusion.get("selection")
    if sel:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in sel["valid_ndcg@10"].items())
        what = (
            "Model whose score is fused with the pool's candidates, chosen as retrieval.source=auto chooses"
            if str(fusion.get("candidates", "")).startswith("pool")
            else "Collaborative retriever chosen by retrieval.source=auto"
        )
        lines.append(
            f"{what}: **{sel['chosen']}** ({sel['chosen_by']}, {sel['users']} validation users: {scores})."
        )
    if fusion.get("candidates", fusion["source"]) != fusion["source"]:
        lines.append(f"Candidates: {fusion['candidates']}, by reciprocal rank fusion.")
    by_model = fusion.get("candidate_recall_by_model")
    if by_model:
        lines.append(
            f"Validation recall of {by_model['n_candidates']} candidates ({by_model['users']} users; the ceiling "
            "of genrec's recall with them): "
            + ", ".join(f"{k} {v:.1%}" for k, v in by_model["recall"].items())
            + "."
        )
    by_n = fusion.get("valid_ndcg@10_by_n_candidates")
    if by_n:
        lines.append(
            f"{fusion['n_candidates']} candidates, chosen with the weight on validation NDCG@10 (best weight per "
            "number: " + ", ".join(f"{n} -> {max(g.values()):.4f}" for n, g in by_n.items()) + ")."
        )
    grid = fusion.get("valid_ndcg@10")
    lines.append(
        f"Fusion weight {fusion['weight']:g} for the {fusion['source']} score ({fusion.get('chosen_by', 'set')}"
        + (f": {', '.join(f'{w} -> {v:.4f}' for w, v in grid.items())}" if grid else "")
        + (
            f"; the candidates held {fusion['candidate_recall']:.1%} of the validation items"
            if "candidate_recall" in fusion
            else ""
        )
        + ")."
    )
    return lines


def text_fusion_text(info: dict[str, Any] | None) -> list[str]:
    """The report's line on the need's text score fused into genrec's ranking (retrieval.text_weight; nothing
    outside the need protocol or without text item embeddings)."""
    if not info:
        return []
    grid = info.get("valid_ndcg@10")
    return [
        f"The need's text score (its cosine with each item's embedding) fused with weight {info['weight']:g} "
        f"({info.get('chosen_by', 'set')}"
        + (f", {info['users']} users" if "users" in info else "")
        + (f": {', '.join(f'{w} -> {v:.4f}' for w, v in grid.items())}" if grid else "")
        + ")."
    ]


def rl_text(info: dict[str, Any] | None) -> list[str]:
    """The report's line on the RL stage after SFT (genrec.rl): what it did and whether its model is the one
    evaluated (nothing when the run had none)."""
    if not info:
        return []
    which = (
        "the RL model is the one evaluated (the SFT model is in merged-sft/)"
        if info["kept"]
        else "the SFT model is the one evaluated"
    )
    return [
        f"RL after SFT ({info['reward']} reward, {info['steps']} steps of {info['users_per_step']} users x "
        f"{info['group']} items, {info['seconds']} s): validation NDCG@10 {info['valid_ndcg@10_sft']:.4f} (SFT) -> "
        f"{info['valid_ndcg@10_rl']:.4f} on {info['valid_users']} users{_gain_text(info.get('valid_ndcg@10_gain'))}; "
        f"rl.keep={info['keep']}: {which}."
    ]


def _gain_text(gain: dict[str, float] | None) -> str:
    """`, paired difference +0.0123 [-0.0040, +0.0286]` (runs made before the interval was recorded: nothing)."""
    if not gain:
        return ""
    return f", paired difference {gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]"


def paired_table(vs: dict[str, dict[str, dict[str, float]]], users: int) -> list[str]:
    """The report's section on genrec minus each baseline, user by user, with 95% intervals."""
    if not vs:
        return []
    metrics = list(next(iter(vs.values())))
    lines = [
        "",
        "## genrec against each baseline, user by user",
        "",
        f"Δ = genrec minus the baseline, the mean over the same {users} users of each user's difference; in brackets "
        "its 95% interval (mean ± 1.96 standard errors of the per-user differences). An interval that holds 0 "
        "means these users do not tell the two apart on that metric.",
        "",
        "| baseline | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, by_metric in vs.items():
        cells = [
            f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
            + ("" if d["low"] <= 0 <= d["high"] else " *")
            for d in by_metric.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "\\* the interval excludes 0."]
    return lines


def popularity_only(data: Interactions, split: str, ks: Sequence[int]) -> dict[str, float]:
    """Popularity baseline alone (no model), for quick data checks."""
    examples = leave_one_out(data, split)
    counts = popularity(data, split=split)
    res, _ = summarize(
        "popularity",
        popularity_lists(examples, counts, max(ks)),
        examples,
        ks=ks,
        n_items=len(data.catalog),
        item_pop=counts,
        n_users_train=len(data),
    )
    return res
