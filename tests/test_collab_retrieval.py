"""The collaborative retriever (retrieval.source), the fused score and its weight chosen on the validation split."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from genrec.config import RankingOptions, apply_overrides
from genrec.data import leave_one_out
from genrec.errors import ConfigError, GenrecError
from genrec.evaluation import choose_fusion_weight, evaluate, fused_order, lm_candidate_scores
from genrec.pipeline import train_retriever
from genrec.recommender import Recommender, history_requests, load_retrieval
from genrec.retrieval import (
    CollaborativeRetriever,
    ItemKNNRetriever,
    MarkovRetriever,
    SASRecRetriever,
    fuse,
    load_collaborative,
    log_softmax,
)
from genrec.topk import top_k_rows


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


@pytest.fixture(scope="module")
def markov(trained):
    run, _, _ = trained
    return MarkovRetriever.fit(run.load_data())


def with_collab(rec, collab, weight, **retrieval):
    """The trained run's Recommender (text retriever) with a collaborative retriever and fusion weight."""
    cfg = dataclasses.replace(
        rec.cfg, retrieval=dataclasses.replace(rec.cfg.retrieval, source=collab.kind, **retrieval)
    )
    return Recommender(
        rec.run, cfg, rec.data, rec.ids, rec.engine, rec.retriever, collab=collab, fusion_weight=weight
    )


@pytest.fixture(scope="module")
def base_rec(trained):
    run, _, _ = trained
    return Recommender.load(run)


def test_log_softmax_and_fuse():
    s = np.array([2.0, 0.0, -1.0])
    assert np.exp(log_softmax(s)).sum() == pytest.approx(1.0)
    assert np.allclose(log_softmax(s + 100.0), log_softmax(s))  # shift-invariant, no overflow
    lm = np.array([-1.0, -0.5, -3.0])
    assert np.array_equal(fuse(lm, s, 0.0), lm)
    assert np.allclose(fuse(lm, s, 2.0), lm + 2.0 * log_softmax(s))
    assert fused_order([7, 8, 9], lm, s, 0.0) == [8, 7, 9]
    assert fused_order([7, 8, 9], lm, s, 100.0) == [7, 8, 9]  # the retriever's order


@pytest.mark.parametrize("kind", ["markov", "itemknn", "sasrec"])
def test_collaborative_search_skips_seen_and_excluded_items_and_saves(trained, tmp_path, kind):
    run, _, _ = trained
    data = run.load_data()
    model = {
        "markov": lambda: MarkovRetriever.fit(data),
        "itemknn": lambda: ItemKNNRetriever.fit(data),
        "sasrec": lambda: SASRecRetriever.fit(data, epochs=2, seed=0, progress=False),
    }[kind]()
    histories = [s[:-1] for s in data.sequences[:20]]
    exclude = [[s[-1]] for s in data.sequences[:20]]
    items, scores = model.search(histories, 15, exclude=exclude)
    full = model.scores(histories)
    for h, ex, row, srow, sc in zip(histories, exclude, items, scores, full, strict=True):
        assert not set(row.tolist()) & (set(h) | set(ex)) and len(set(row.tolist())) == len(row)
        assert np.allclose(srow, sc[row])  # the item's own score, best first
        allowed = np.setdiff1d(np.arange(len(sc)), list(h) + list(ex))
        assert srow[-1] >= np.sort(sc[allowed])[-15] - 1e-6  # no better item left out
        assert np.all(np.diff(srow) <= 1e-6)
    got = model.scores_of(histories, items.tolist())
    assert all(np.allclose(g, f[row]) for g, f, row in zip(got, full, items, strict=True))
    model.save(tmp_path)
    again = load_collaborative(tmp_path, kind)
    assert np.allclose(again.scores(histories), full)


def test_candidates_come_from_the_collaborative_retriever(base_rec, markov):
    rec = with_collab(base_rec, markov, 0.0)
    hist = [s[:-1] for s in rec.data.sequences[:8]]
    ranked = rec.rank_histories(hist, options=RankingOptions(n_items=5, n_candidates=12))
    want, _ = markov.search(hist, 12, exclude=hist)
    for recs, cands in zip(ranked, want, strict=True):
        assert {r.item for r in recs} <= set(cands.tolist())


def test_union_takes_half_from_the_collaborative_retriever_and_fills_from_text(base_rec, markov):
    rec = with_collab(base_rec, markov, 0.0)
    rec.cfg.retrieval.source = "union"
    hist = [s[:-1] for s in rec.data.sequences[:8]]
    got = rec.collaborative_candidates(hist, n=[9] * 8, exclude=[[]] * 8)
    own, _ = markov.search(hist, 5, exclude=hist)
    text = rec.retrieved_many(hist, n=[9] * 8, exclude=[[]] * 8)
    for lst, mine, txt, h in zip(got, own, text, hist, strict=True):
        assert lst[:5] == mine.tolist() and len(lst) == len(set(lst)) == 9
        assert set(lst[5:]) <= set(txt) and not set(lst) & set(h)


def test_fused_ranking_reorders_every_candidate_not_the_lms_top_few(base_rec, markov):
    """With a large weight the fused top-3 is the retriever's best among all candidates: ranking only the LM's
    own top 3 (the requests' width) and reordering those would give other items."""
    lm_rec = with_collab(base_rec, markov, 0.0)
    examples = leave_one_out(lm_rec.data, "test")[:16]
    cfg = dataclasses.replace(lm_rec.cfg, eval=dataclasses.replace(lm_rec.cfg.eval, n_candidates=12))
    items, lm = lm_candidate_scores(lm_rec, examples, cfg, progress=False)
    coll = markov.scores_of([ex.history for ex in examples], items)
    fused_rec = with_collab(base_rec, markov, 50.0)
    got = fused_rec.rank_requests(
        history_requests(
            [ex.history for ex in examples], options=RankingOptions(n_items=3, n_candidates=12, beam_width=3)
        )
    )
    differs = 0
    for recs, its, s, c in zip(got, items, lm, coll, strict=True):
        want = fused_order(its, s, c, 50.0)[:3]
        assert [r.item for r in recs] == want
        assert np.allclose([r.score for r in recs], np.sort(fuse(s, c, 50.0))[::-1][:3])
        differs += set(want) != set(its[:3])
    assert differs > 0  # the case the test is for occurs


def test_a_fused_batch_runs_the_collaborative_model_once(base_rec, markov):
    """Ranking a fused batch searches the model's candidates and fuses its scores of them: one pass of the model
    over the batch's histories (Markov here; the same for SASRec, whose pass costs a forward), with the same
    candidates and scores as two passes gave, and a new batch is scored afresh."""
    rec = with_collab(base_rec, markov, 4.0)
    histories = [ex.history for ex in leave_one_out(rec.data, "test")[:8]]
    opts = RankingOptions(n_items=3, n_candidates=12)
    want = [
        (list(items[items >= 0]), markov.scores(histories)[k, items[items >= 0]])
        for k, items in enumerate(markov.search(histories, 12, exclude=histories)[0])
    ]
    calls: list[int] = []
    scores = markov.scores
    markov.scores = lambda hs: calls.append(len(hs)) or scores(hs)  # type: ignore[method-assign]
    try:
        markov._last = None
        prepared = rec.prepare(history_requests(histories, options=opts))
        assert calls == [8]
        rec.prepare(history_requests(histories[:4], options=opts))
        assert calls == [8, 4]
    finally:
        del markov.scores
    assert prepared.retrieved_scores is not None
    for (items, s), got, got_s in zip(want, prepared.retrieved, prepared.retrieved_scores, strict=True):
        assert got == items and np.allclose(got_s, s)
    with pytest.raises(ValueError, match="read-only"):
        markov.batch_scores(histories)[0, 0] = 1.0


@pytest.mark.parametrize("candidates", ["all", "retriever"])
def test_a_fused_run_ranks_whole_catalogue_and_text_only_requests(base_rec, markov, candidates):
    """A run with a fused collaborative score still ranks requests that have nothing to fuse: the whole
    catalogue (no candidate list) and free text alone (no history to score), alone in a batch or together."""
    rec = with_collab(base_rec, markov, 4.0)
    hist = leave_one_out(rec.data, "test")[0].history
    opts = RankingOptions(n_items=3, candidates=candidates, n_candidates=12)
    alone = rec.rank_histories([[]], opts, queries=["something new"])
    both = rec.rank_histories([[], hist], opts, queries=["something new", None])
    for recs in (*alone, *both):
        assert len(recs) == 3 and len({r.item for r in recs}) == 3
    assert [r.item for r in both[0]] == [r.item for r in alone[0]]


def test_an_auto_weight_not_yet_chosen_names_the_command(base_rec, markov):
    rec = with_collab(base_rec, markov, None)
    with pytest.raises(GenrecError, match="genrec train"):
        rec.rank_histories([rec.data.sequences[0][:-1]], options=RankingOptions(n_items=3))
    assert rec.rank_histories(
        [rec.data.sequences[0][:-1]], options=RankingOptions(n_items=3, candidates="all")
    )  # the LM alone needs none


def test_the_weight_is_the_grids_best_on_validation_and_recorded(trained, base_rec, markov):
    run, _, _ = trained
    rec = with_collab(base_rec, markov, None, fusion_grid=[0.0, 1.0, 30.0], tune_users=60)
    cfg = dataclasses.replace(rec.cfg, eval=dataclasses.replace(rec.cfg.eval, n_candidates=15))
    info = choose_fusion_weight(rec, cfg, progress=False)
    assert info["weight"] == rec.fusion_weight and info["users"] == 60
    valid = leave_one_out(rec.data, "valid")[:60]
    assert valid[0].history == tuple(rec.data.sequences[0][:-2])  # the validation item, never the test item
    items, lm = lm_candidate_scores(rec, valid, cfg, progress=False)
    coll = markov.scores_of([ex.history for ex in valid], items)
    for w in (0.0, 1.0, 30.0):
        hits = []
        for its, s, c, ex in zip(items, lm, coll, valid, strict=True):
            top = fused_order(its, s, c, w)[:10]
            hits.append(1 / np.log2(top.index(ex.target) + 2) if ex.target in top else 0.0)
        assert info["valid_ndcg@10"][f"{w:g}"] == pytest.approx(np.mean(hits))
    assert info["valid_ndcg@10"][f"{info['weight']:g}"] == max(info["valid_ndcg@10"].values())
    assert run.meta()["retrieval"]["fusion"]["weight"] == info["weight"]


def test_train_retriever_saves_it_and_the_recommender_loads_it(tmp_path):
    from tests.conftest import make_run

    run, cfg = make_run(tmp_path, "collab", ["retrieval.source=markov", "retrieval.fusion_weight=auto"])
    with pytest.raises(GenrecError, match="genrec train"):
        load_retrieval(run, cfg)
    info = train_retriever(run, cfg)
    assert info is not None and (run.path / info["file"]).is_file()
    collab, weight = load_retrieval(run, cfg)
    assert isinstance(collab, MarkovRetriever) and weight is None  # auto: not chosen yet
    run.update_meta(retrieval={**run.meta()["retrieval"], "fusion": {"weight": 2.0}})
    assert load_retrieval(run, cfg)[1] == 2.0
    train_retriever(run, cfg)  # trained again: the weight chosen for the earlier model is dropped
    assert load_retrieval(run, cfg)[1] is None
    fixed = apply_overrides(cfg, ["retrieval.fusion_weight=0.5"])
    assert load_retrieval(run, fixed)[1] == 0.5
    assert train_retriever(run, apply_overrides(cfg, ["retrieval.source=text"])) is None


def test_a_target_outside_the_candidates_counts_as_not_ranked(trained, base_rec, markov):
    """Metrics stay full-ranking: with 4 candidates, genrec's Recall@10 is the share of users whose test item is
    among them."""
    run, cfg, _ = trained
    cfg = apply_overrides(
        cfg,
        [
            "eval.candidates=retriever",
            "eval.n_candidates=4",
            "retrieval.source=markov",
            "eval.baselines=[popularity]",
        ],
    )
    rec = with_collab(base_rec, markov, 0.0)
    report = evaluate(run, cfg, rec=rec, progress=False)
    examples = leave_one_out(rec.data, "test")[: cfg.eval.max_users]
    cands, _ = markov.search([ex.history for ex in examples], 4, exclude=[ex.history for ex in examples])
    inside = np.mean([ex.target in row for ex, row in zip(examples, cands.tolist(), strict=True)])
    assert report["results"]["genrec"]["recall@10"] == pytest.approx(inside) and inside < 1.0
    assert "counts as not ranked" in report["protocol"] and report["retrieval"]["weight"] == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("retrieval.fusion_weight=-1", "retrieval.fusion_weight must be >= 0"),
        ("retrieval.fusion_weight=best", "retrieval.fusion_weight"),
        ("retrieval.fusion_grid=[]", "retrieval.fusion_grid"),
        ("retrieval.text_weight=-1", "retrieval.text_weight must be >= 0"),
        ("retrieval.text_weight=best", "retrieval.text_weight"),
        ("retrieval.text_grid=[]", "retrieval.text_grid"),
        ("retrieval.tune_users=-2", "retrieval.tune_users"),
        ("retrieval.source=knn", "retrieval.source"),
        ("retrieval.collaborative=text", "retrieval.collaborative"),
        ("retrieval.auto_models=[markov,knn]", "retrieval.auto_models"),
        ("retrieval.auto_models=[]", "retrieval.auto_models"),
        ("retrieval.auto_models=[markov,markov]", "retrieval.auto_models"),
    ],
)
def test_bad_retrieval_settings_are_named(override, message):
    from genrec.config import RunConfig

    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [override])


def test_the_sasrec_baseline_ranks_with_the_runs_retriever_only_where_it_is_the_same_training(
    tmp_path, monkeypatch
):
    import genrec.baselines as baselines
    from genrec.evaluation import sasrec_from_retriever
    from tests.conftest import make_run

    run, cfg = make_run(
        tmp_path, "reuse", ["retrieval.source=sasrec", "eval.sasrec_epochs=4", "eval.max_users=null"]
    )
    train_retriever(run, cfg, progress=False)
    collab, _ = load_retrieval(run, cfg)
    rec = type("Rec", (), {"run": run, "collab": collab, "data": run.load_data()})()
    examples = leave_one_out(rec.data, "test")
    kept = sasrec_from_retriever(rec, examples, cfg, k=10)
    trained_again = baselines.sasrec_lists(
        rec.data, examples, split="test", k=10, cfg=baselines.SASRecConfig(epochs=4, seed=0), progress=False
    )
    assert kept == trained_again
    assert sasrec_from_retriever(rec, examples, apply_overrides(cfg, ["eval.sasrec_epochs=5"]), k=10) is None
    assert sasrec_from_retriever(rec, examples, apply_overrides(cfg, ["train.seed=1"]), k=10) is None
    assert sasrec_from_retriever(rec, examples, apply_overrides(cfg, ["eval.split=valid"]), k=10) is None


def test_the_itemknn_retriever_is_the_itemknn_baselines_model(trained):
    """The retriever ranks as the item-kNN baseline does (the same similarity and scores; ties may be listed in
    another order, so the lists' scores are compared)."""
    import genrec.baselines as baselines

    run, _, _ = trained
    data = run.load_data()
    examples = leave_one_out(data, "test")[:40]
    model = ItemKNNRetriever.fit(data)
    items, scores = model.search([ex.history for ex in examples], 10)
    want = baselines.itemknn_lists(data, examples, split="test", k=10)
    full = model.scores([ex.history for ex in examples])
    for srow, lst, sc in zip(scores, want, full, strict=True):
        assert np.allclose(srow, sc[lst]) and len(lst) == 10
    assert np.mean([ex.target in row for ex, row in zip(examples, items.tolist(), strict=True)]) > 0


@pytest.mark.parametrize("kind", ["markov", "itemknn"])
def test_choices_on_validation_use_a_model_fitted_without_the_validation_targets(tmp_path, kind):
    """A Markov chain or item-kNN fitted on the items before each test item has seen every validation target
    after its history, and would score it from memory: retriever/valid/ holds the one fitted without them, and
    the fusion weight's choice loads it."""
    from genrec.evaluation import validation_collab
    from tests.conftest import make_run

    run, cfg = make_run(tmp_path, "valid", [f"retrieval.source={kind}"])
    train_retriever(run, cfg, progress=False)
    data = run.load_data()
    collab, _ = load_retrieval(run, cfg)
    on_valid = validation_collab(type("Rec", (), {"run": run, "collab": collab})())
    fitted = {"markov": MarkovRetriever, "itemknn": ItemKNNRetriever}[kind].fit(data, split="valid")
    histories = [list(ex.history) for ex in leave_one_out(data, "valid")[:30]]
    assert np.allclose(on_valid.scores(histories), fitted.scores(histories))
    assert not np.allclose(collab.scores(histories), on_valid.scores(histories))  # the test model differs


def retriever_run(trained, tmp_path, source, *, n_candidates):
    """A copy of the trained run whose retriever stage ran with retrieval.source=`source` over the Markov chain
    and item-kNN (weight and model chosen on 40 validation users): (run, config, the stage's record)."""
    import shutil

    run, cfg, _ = trained
    copy = type(run)(tmp_path / source)
    shutil.copytree(run.path, copy.path)
    cfg = apply_overrides(
        cfg,
        [
            f"retrieval.source={source}",
            "retrieval.auto_models=[markov,itemknn]",
            "retrieval.fusion_weight=auto",
            "retrieval.fusion_grid=[0,1,8]",
            "retrieval.tune_users=40",
            "eval.candidates=retriever",
            f"eval.n_candidates={n_candidates}",
            "eval.baselines=[popularity]",
        ],
    )
    copy.save_config(cfg)
    return copy, cfg, train_retriever(copy, cfg, progress=False)


def test_auto_keeps_the_best_model_on_validation_and_says_so(trained, tmp_path):
    """retrieval.source=auto: every model of retrieval.auto_models is fitted and scored alone on validation; the
    best is loaded, recorded in run.json, and named in the eval report with the fusion weight chosen for it."""
    from genrec.evaluation.metrics import user_metrics

    copy, cfg, info = retriever_run(trained, tmp_path, "auto", n_candidates=8)
    assert info is not None
    sel = info["selection"]
    assert set(sel["valid_ndcg@10"]) == {"markov", "itemknn"} and sel["users"] == 40
    assert sel["valid_ndcg@10"][sel["chosen"]] == max(sel["valid_ndcg@10"].values())
    data = copy.load_data()
    valid = leave_one_out(data, "valid")[:40]
    fitted = ItemKNNRetriever.fit(data, split="valid")
    lists, _ = fitted.search([list(ex.history) for ex in valid], 10)
    want = np.mean(
        [user_metrics(r.tolist(), ex.target, [10])["ndcg@10"] for r, ex in zip(lists, valid, strict=True)]
    )
    assert sel["valid_ndcg@10"]["itemknn"] == pytest.approx(want)
    assert copy.meta()["retrieval"]["collaborative"] == sel["chosen"]
    rec = Recommender.load(copy)
    assert rec.collab is not None and rec.collab.kind == sel["chosen"]
    report = evaluate(copy, cfg, rec=rec, progress=False)
    assert report["retrieval"]["selection"]["chosen"] == sel["chosen"]
    assert report["retrieval"]["weight"] in (0.0, 1.0, 8.0)
    assert f"{sel['chosen']} (retrieval.source=auto)" in report["protocol"]
    assert "chosen by retrieval.source=auto" in (copy.path / "report_test.md").read_text()


def test_auto_without_a_choice_names_the_command(tmp_path):
    from tests.conftest import make_run

    run, cfg = make_run(tmp_path, "nochoice", ["retrieval.source=auto"])
    with pytest.raises(GenrecError, match="genrec train"):
        load_retrieval(run, cfg)


def test_the_sasrec_baseline_reuses_the_sasrec_that_auto_fitted_and_did_not_choose(tmp_path):
    from genrec.evaluation import sasrec_from_retriever
    from tests.conftest import make_run

    run, cfg = make_run(
        tmp_path,
        "autosas",
        ["retrieval.source=auto", "retrieval.auto_models=[markov,sasrec]", "eval.sasrec_epochs=2"],
    )
    train_retriever(run, cfg, progress=False)
    collab, _ = load_retrieval(run, cfg)
    saved = load_collaborative(run.retriever_dir, "sasrec")
    rec = type("Rec", (), {"run": run, "collab": collab, "data": run.load_data()})()
    examples = leave_one_out(rec.data, "test")[:20]
    kept = sasrec_from_retriever(rec, examples, cfg, k=10)
    assert kept is not None
    items, _ = saved.search([list(ex.history) for ex in examples], 10)
    assert [set(k) for k in kept] == [set(r.tolist()) for r in items]


# -- pooled candidates (retrieval.source=pool) ----------------------------------------------------------------


class _Constant(MarkovRetriever):
    """A model that scores every item alike: it tells no item apart, so it must not take a pool's slots."""

    kind = "constant"

    def scores(self, histories):
        return np.ones((len(histories), self.n_items))


def _rrf_by_hand(members, history, banned):
    """Reciprocal rank fusion written out: per member, the items it scores above its lowest allowed score get
    1 / (60 + their rank among the allowed items), and 1 more within its first 10."""
    pooled: dict[int, float] = {}
    firsts: dict[str, list[int]] = {}
    for m in members:
        s = m.scores([history])[0].astype(float)
        allowed = [i for i in range(len(s)) if i not in banned]
        floor = min(s[i] for i in allowed)
        ranked = sorted(allowed, key=lambda i: -s[i])  # stable: equal scores keep item order
        firsts[m.kind] = [i for i in ranked[:10] if s[i] > floor]
        for rank, i in enumerate(ranked, 1):
            if s[i] > floor:
                pooled[i] = pooled.get(i, 0.0) + 1 / (60 + rank) + (rank <= 10)
    return pooled, firsts


@pytest.fixture(scope="module")
def members(trained):
    from genrec.retrieval import Retriever, TextScores

    run, _, _ = trained
    data = run.load_data()
    return [
        MarkovRetriever.fit(data),
        ItemKNNRetriever.fit(data),
        TextScores(Retriever(run.load_embeddings())),
    ]


def test_pooled_candidates_are_distinct_valid_n_long_and_fused_by_rank(trained, members):
    from genrec.retrieval import PooledRetriever

    run, _, _ = trained
    data = run.load_data()
    pool = PooledRetriever(members, scorer=members[1])
    histories = [s[:-1] for s in data.sequences[:30]]
    exclude = [[s[-1]] for s in data.sequences[:30]]
    items, scores = pool.search(histories, 30, exclude=exclude)  # 3 members x their first 10
    assert items.shape == (30, 30)
    for h, ex, row, srow in zip(histories, exclude, items.tolist(), scores, strict=True):
        assert len(set(row)) == 30 and all(0 <= i < len(data.catalog) for i in row)
        assert not set(row) & (set(h) | set(ex))
        want, firsts = _rrf_by_hand(members, h, set(h) | set(ex))
        assert np.allclose(srow, [want.get(i, 0.0) for i in row])
        assert np.all(np.diff(srow) <= 1e-12)  # best first
        assert sorted(want.values(), reverse=True)[:30] == pytest.approx(
            list(srow)
        )  # no better item left out
        for kind, first in firsts.items():  # every member's first items get in, not the consensus alone
            assert set(first) <= set(row) and (kind == "itemknn" or len(first) == 10), kind
    assert np.allclose(pool.scores(histories), members[1].scores(histories))  # the fused score: the scorer's
    assert pool.score_kind == "itemknn" and pool.label == "pool of markov+itemknn+text"


def test_a_member_that_tells_no_items_apart_leaves_the_slots_to_the_others(trained, members):
    """Ties at a model's lowest score are no ranking: the pool of item-kNN and a model that scores every item
    alike lists item-kNN's informed items first, then the scorer's order; a top n is the prefix of a top N."""
    from genrec.retrieval import PooledRetriever

    run, _, _ = trained
    data = run.load_data()
    knn, markov = members[1], members[0]
    constant = _Constant(knn.sim * 0, np.zeros(knn.n_items))
    pool = PooledRetriever([constant, knn], scorer=markov)
    histories = [s[:-1] for s in data.sequences[:20]]
    items, _ = pool.search(histories, 60)
    knn_s, markov_s = knn.scores(histories), markov.scores(histories)
    for h, row, ks, ms in zip(histories, items.tolist(), knn_s, markov_s, strict=True):
        allowed = np.setdiff1d(np.arange(len(ks)), h)
        informed = set(allowed[ks[allowed] > ks[allowed].min()].tolist())
        n_inf = min(len(informed), 60)
        assert set(row[:n_inf]) <= informed and len(informed) > 0
        rest = [i for i in row[n_inf:]]
        assert all(ms[a] >= ms[b] for a, b in itertools.pairwise(rest))  # the scorer fills the rest
    shorter, _ = pool.search(histories, 17)
    assert np.array_equal(shorter, items[:, :17])


def test_pool_settings_are_checked_and_named():
    from genrec.config import RunConfig

    with pytest.raises(ConfigError, match="retrieval.source=pool"):
        apply_overrides(
            RunConfig(),
            ["retrieval.source=pool", "retrieval.auto_models=[markov]", "retrieval.pool_text=false"],
        )
    with pytest.raises(ConfigError, match="retrieval.pool_text"):
        apply_overrides(RunConfig(), ["retrieval.pool_text=maybe"])
    cfg = apply_overrides(RunConfig(), ["retrieval.source=pool", "retrieval.auto_models=[markov]"])
    assert cfg.retrieval.pool_text  # one model and the text retriever: a pool of two


def test_pool_is_trained_loaded_served_and_its_recall_recorded(trained, tmp_path):
    """genrec train's retriever stage for retrieval.source=pool: every model fitted, the scorer chosen on
    validation; run.json records each model's and the pool's validation recall of eval.n_candidates candidates
    (the models fitted without the validation targets); the Recommender ranks the pooled candidates, fuses the
    scorer's score, and validation choices use the members fitted without the validation targets."""
    from genrec.evaluation import validation_collab
    from genrec.retrieval import PooledRetriever, Retriever, TextScores

    copy, cfg, info = retriever_run(trained, tmp_path, "pool", n_candidates=12)
    assert info is not None and set(info["selection"]["valid_ndcg@10"]) == {"markov", "itemknn"}
    recall = info["candidate_recall"]
    assert recall["n_candidates"] == 12 and set(recall["recall"]) == {"markov", "itemknn", "text", "pool"}
    data = copy.load_data()
    valid = leave_one_out(data, "valid")
    on_valid = {
        "markov": MarkovRetriever.fit(data, split="valid"),
        "itemknn": ItemKNNRetriever.fit(data, split="valid"),
        "text": TextScores(Retriever(copy.load_embeddings())),
    }
    chosen = info["selection"]["chosen"]
    on_valid_pool = PooledRetriever(list(on_valid.values()), scorer=on_valid[chosen])
    histories = [list(ex.history) for ex in valid]
    for kind, model in [*on_valid.items(), ("pool", on_valid_pool)]:
        items, _ = model.search(histories, 12)
        inside = np.mean([ex.target in row for ex, row in zip(valid, items.tolist(), strict=True)])
        assert recall["recall"][kind] == pytest.approx(inside), kind
    assert recall["recall"]["pool"] < 1.0  # no validation target leaked into the recall

    rec = Recommender.load(copy)
    assert isinstance(rec.collab, PooledRetriever) and rec.collab.score_kind == chosen
    assert [m.kind for m in rec.collab.members] == ["markov", "itemknn", "text"]
    on_val = validation_collab(rec)
    assert np.allclose(on_val.scores(histories[:20]), on_valid[chosen].scores(histories[:20]))
    for m, want in zip(on_val.members, on_valid.values(), strict=True):
        assert np.allclose(m.scores(histories[:20]), want.scores(histories[:20]))
    report = evaluate(copy, cfg, rec=rec, progress=False)
    assert report["retrieval"]["candidates"] == "pool of markov+itemknn+text"
    assert report["retrieval"]["candidate_recall_by_model"]["recall"]["pool"] == recall["recall"]["pool"]
    assert "pool of markov+itemknn+text (retrieval.source=pool)" in report["protocol"]
    shown = (copy.path / "report_test.md").read_text()
    assert "Validation recall of 12 candidates" in shown and "fused with the pool's candidates" in shown
    test = leave_one_out(data, "test")[:8]
    hist = [list(ex.history) for ex in test]
    want, _ = rec.collab.search(hist, 12, exclude=hist)
    got = rec.rank_histories(hist, options=RankingOptions(n_items=5, n_candidates=12))
    for recs, cands in zip(got, want.tolist(), strict=True):
        assert {r.item for r in recs} <= set(cands)


@pytest.mark.slow
def test_checkpoint_selection_ranks_the_runs_candidates_from_models_that_never_saw_the_validation_items(
    tmp_path, monkeypatch
):
    """train.select_metric ranks the validation users over the candidates the LM is finally given (the run's
    collaborative retriever, trained first), from the Markov chain fitted without the validation targets (the
    test-time chain has seen each of them right after its history), by the LM's score alone."""
    from genrec import recommender
    from genrec.training import train
    from tests.conftest import make_run

    made = []
    init = recommender.Recommender.__init__
    monkeypatch.setattr(
        recommender.Recommender, "__init__", lambda self, *a, **kw: made.append(kw) or init(self, *a, **kw)
    )
    run, cfg = make_run(
        tmp_path,
        "select",
        [
            "retrieval.source=markov",
            "eval.candidates=retriever",
            "eval.n_candidates=12",
            "train.max_steps=10",
            "train.save_steps=5",
            "train.early_stopping_patience=2",
            "train.select_metric=ndcg@10",
            "train.valid_users=20",
        ],
    )
    with pytest.raises(GenrecError, match="genrec train"):  # the retriever is trained before the LM
        train(run, cfg)
    train_retriever(run, cfg, progress=False)
    made.clear()
    summary = train(run, cfg)
    assert summary["eval_ndcg@10"] is not None and len(made) == 1
    collab, weight = made[0]["collab"], made[0]["fusion_weight"]
    assert isinstance(collab, MarkovRetriever) and weight == 0.0
    data = run.load_data()
    histories = [list(ex.history) for ex in leave_one_out(data, "valid")[:20]]
    assert np.allclose(collab.scores(histories), MarkovRetriever.fit(data, split="valid").scores(histories))
    assert not np.allclose(collab.scores(histories), load_retrieval(run, cfg)[0].scores(histories))


def test_n_candidates_is_chosen_with_the_weight_on_validation_from_one_ranking(trained, base_rec, markov):
    """retrieval.n_candidates_grid: the LM scores the largest number's candidates once; each smaller number's
    figures are what ranking that many candidates gives (checked against choosing with that number alone), and
    the best (number, weight) is kept, recorded and used as eval.n_candidates from then on."""
    run, _, _ = trained
    rec = with_collab(
        base_rec, markov, None, fusion_grid=[0.0, 1.0, 30.0], tune_users=60, n_candidates_grid=[12, 4]
    )
    info = choose_fusion_weight(rec, rec.cfg, progress=False)
    assert run.meta()["retrieval"]["fusion"]["n_candidates"] == info["n_candidates"]
    by_n = info["valid_ndcg@10_by_n_candidates"]
    assert set(by_n) == {"4", "12"}
    for n in (4, 12):
        alone = with_collab(base_rec, markov, None, fusion_grid=[0.0, 1.0, 30.0], tune_users=60)
        cfg = dataclasses.replace(alone.cfg, eval=dataclasses.replace(alone.cfg.eval, n_candidates=n))
        want = choose_fusion_weight(alone, cfg, progress=False)
        assert by_n[str(n)] == pytest.approx(want["valid_ndcg@10"], abs=1e-9)
    best = max(v for g in by_n.values() for v in g.values())
    assert by_n[str(info["n_candidates"])][f"{info['weight']:g}"] == best
    assert rec.cfg.eval.n_candidates == info["n_candidates"] and rec.fusion_weight == info["weight"]
    assert by_n["4"] != by_n["12"]  # the numbers rank differently: the case the choice is for


def test_n_candidates_grid_settings_are_named():
    from genrec.config import RunConfig

    for bad in (
        ["retrieval.n_candidates_grid=[50,100]", "retrieval.fusion_weight=1"],
        ["retrieval.n_candidates_grid=[50,100]", "retrieval.source=union"],
        ["retrieval.n_candidates_grid=[0,100]"],
    ):
        with pytest.raises(ConfigError, match="retrieval.n_candidates_grid"):
            apply_overrides(RunConfig(), bad)


# -- the top-k cut: equal scores in item order ------------------------------------------------------------------


def test_top_k_rows_orders_ties_by_item_so_a_shorter_list_is_a_prefix():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)  # many ties, at every cut
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    reference = np.argsort(-scores, axis=1, kind="stable")  # best first, ties in item order
    for k in (1, 5, 13, 40, 60):
        items, vals = top_k_rows(scores, k)
        assert items.shape == (50, min(k, 40))
        assert (items == reference[:, : min(k, 40)]).all()
        assert (vals == np.take_along_axis(scores, items, axis=1)).all()
    assert top_k_rows(scores, 0)[0].shape == (50, 0)


class _Tied(CollaborativeRetriever):
    """Scores in 10 levels over 1,000 items, fixed per history: ties at every cut, as a Markov chain's zeros."""

    kind = "tied"

    def scores(self, histories):
        return np.stack([np.random.default_rng(sum(h)).integers(0, 10, self.n_items) for h in histories])


def test_collaborative_search_top_n_is_the_first_n_of_a_longer_search():
    """The choices made on the first n of a longer search (auto's first 10, retrieval.n_candidates_grid) rely on
    the prefix; argpartition alone breaks it where the cut falls inside a tie."""
    model = _Tied(1000)
    histories = [[i, i + 7, i + 11] for i in range(32)]
    long_items, long_scores = model.search(histories, 200, exclude=[[i + 1] for i in range(32)])
    for n in (3, 10, 25, 100):
        items, scores = model.search(histories, n, exclude=[[i + 1] for i in range(32)])
        assert (items == long_items[:, :n]).all() and np.array_equal(scores, long_scores[:, :n])
    for row, h in zip(long_items, histories, strict=True):  # the history and the excluded item are skipped
        assert not {*h, h[0] + 1} & set(row.tolist())
