"""Text in the loop: derived needs, the multi-task rows, held-out (cold) items, text-conditioned ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genrec.config import RankingOptions, apply_overrides
from genrec.data import Catalog, Interactions, cold_item_rows, history_windows, leave_one_out, without_items
from genrec.data.loaders import load_unisrec
from genrec.data.needs import derive_need, title_hint
from genrec.data.synthetic import generate
from genrec.evaluation import evaluate
from genrec.ids import semantic_ids, with_cold_items
from genrec.recommender import RankRequest, Recommender
from genrec.task_rows import RowMaker, item_rows_items, picked
from genrec.training import train
from tests.conftest import make_run


def test_a_derived_need_never_holds_its_items_whole_title():
    catalog, _, _ = generate(400, 20, seed=3)
    tricky = Catalog(
        ["a", "b", "c", "d"],
        ["Lumiere", "Skincare", "Two Words", ""],
        ["", "", "", ""],
        [{"brand": "Lumiere"}, {"category": "Skincare"}, {"genres": "Drama|Comedy"}, {}],
    )
    for cat in (catalog, tricky):
        for item in range(len(cat)):
            for user in ("u1", "u2", "u3"):
                for words in (0, 2, 10):
                    need = derive_need(cat, item, user=user, seed=7, title_words=words)
                    title = cat.titles[item].strip().lower()
                    assert need and (not title or title not in need.lower()), (need, title)
    need = derive_need(catalog, 0, user="u", seed=1)
    assert catalog.attributes[0]["category"].lower() in need
    assert derive_need(catalog, 0, user="u", seed=1) == need  # deterministic


def test_a_title_hint_gives_fewer_than_half_of_the_titles_words():
    """A short title's words name the item ("Toy Story (1995)": two words and a year), so it gives no hint."""
    rng = np.random.default_rng(0)
    for title in [
        "One",
        "Two Words",
        "Toy Story (1995)",
        "Gorilla Original Gorilla Glue, Waterproof",
        "a b c",
    ]:
        for words in range(6):
            hint = title_hint(title, words=words, rng=rng)
            longer = [w for w in title.replace(",", " ").split() if len(w) >= 3 and w.isalpha()]
            assert 2 * len(hint.split()) < len(longer) or not hint, (title, hint)
    assert title_hint("Toy Story (1995)", words=2, rng=rng) == ""
    assert title_hint("Raiders of the Lost Ark (1981)", words=2, rng=rng) in {"Raiders", "the", "Lost", "Ark"}
    assert len(title_hint("Gorilla Original Glue, Waterproof Outdoor Formula", words=2, rng=rng).split()) == 2


def test_unisrec_text_gives_category_and_brand_attributes(tmp_path):
    (tmp_path / "X.text").write_text(
        "item_id:token\ttext:token_seq\n"
        "A1\tGorilla Glue, 8 ounce. Industrial & Scientific Tapes Urethane Adhesives. Gorilla. \n"
        "A2\tJust a title\n"
    )
    (tmp_path / "X.item2index").write_text("A1\t1\nA2\t2\n")
    (tmp_path / "X.test.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\nu\t1\t2\n")
    catalog, _, _ = load_unisrec(tmp_path)
    assert catalog.attributes[0] == {
        "category": "Industrial & Scientific Tapes Urethane Adhesives",
        "brand": "Gorilla",
    }
    assert catalog.attributes[1] == {}
    assert "urethane adhesives" in derive_need(catalog, 0, seed=0)


def test_held_out_items_are_in_no_training_window_but_targets_stay_in_place(small_data):
    cold = cold_item_rows(len(small_data.catalog), 0.2, seed=0)
    assert cold == cold_item_rows(len(small_data.catalog), 0.2, seed=0) and len(cold) == round(
        0.2 * len(small_data.catalog)
    )
    seen = without_items(small_data, cold)
    for ex in history_windows(seen, window=4):
        assert not set(ex.history) & set(cold) and ex.target not in cold
    assert [ex.target for ex in leave_one_out(seen, "test")] == [
        ex.target for ex in leave_one_out(small_data, "test")
    ]
    assert items_free_of(item_rows_items(len(small_data.catalog), 2.0, exclude=cold, seed=0), cold)


def items_free_of(items, banned):
    return not set(items) & set(banned)


def test_picked_gives_whole_multiples_then_a_drawn_rest():
    rng = np.random.default_rng(0)
    out = picked(10, 2.5, rng)
    assert len(out) == 25 and all(out.count(i) in (2, 3) for i in range(10))
    assert picked(10, 0.0, rng) == [] and picked(0, 1.0, rng) == []


def test_held_out_items_get_codes_from_the_codebooks_of_the_others():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(120, 8)).astype(np.float32)
    cold = [3, 50, 99]
    warm = [i for i in range(120) if i not in cold]
    fitted = semantic_ids(emb[warm], levels=2, codes=4, collision_headroom=4, seed=0)
    ids = with_cold_items(fitted, emb, warm, cold)
    assert len(ids) == 120 and len({tuple(r) for r in ids.codes.tolist()}) == 120  # unique IDs
    np.testing.assert_array_equal(ids.codes[warm], fitted.codes)
    for row in cold:  # nearest first-level code, as a new item would get
        assert ids.codes[row, 0] == int(np.argmin(((fitted.codebooks[0] - emb[row]) ** 2).sum(1)))


def test_text_rows_label_the_title_and_the_end_of_turn_only(tiny_lm):
    _, tok, _ = tiny_lm
    maker = RowMaker(tok)
    prompt = [{"role": "user", "content": "Item ID: <a_1><b_2> Its title?"}]
    row = maker.text_row(prompt, "the cat sat")
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
    assert tok.decode(labelled[:-1]) == "the cat sat" and labelled[-1] == tok.convert_tokens_to_ids(
        "<|im_end|>"
    )
    answer = tok.convert_tokens_to_ids(["<a_1>", "<b_2>"])
    id_row = maker.id_row(prompt, "<a_1><b_2>", answer)
    assert [lab for lab in id_row["labels"] if lab != -100] == answer


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny atomic-ID run with items held out and every text task mixed in (text embeddings: MiniLM)."""
    run, cfg = make_run(
        tmp_path_factory.mktemp("text"),
        "text",
        [
            "ids.embedding=text",
            "ids.scheme=atomic",
            "data.cold_items=0.15",
            "train.need_rows=0.5",
            "train.item_text_rows=0.5",
            "train.title_rows=0.5",
            "train.max_steps=12",
            "eval.baselines=[popularity,retriever,markov]",
        ],
    )
    return run, cfg


def test_no_held_out_item_in_any_training_row(text_run, monkeypatch):
    from datasets import Dataset

    run, cfg = text_run
    rows: list[dict] = []
    original = Dataset.from_list

    def record(items, *a, **kw):
        rows.extend(items)
        return original(items, *a, **kw)

    monkeypatch.setattr(Dataset, "from_list", staticmethod(record))
    summary = train(run, cfg)
    assert summary["steps"] == 12
    meta = run.meta()["multitask"]
    assert meta["need"] > 0 and meta["item_id"] > 0 and meta["id_title"] > 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    ids = run.load_ids()
    cold_tokens = set(tok.convert_tokens_to_ids([ids.item_string(i) for i in run.cold_items()]))
    assert cold_tokens and all(not cold_tokens & set(r["input_ids"]) for r in rows)
    warm_tokens = set(tok.convert_tokens_to_ids([ids.item_string(i) for i in range(len(ids))])) - cold_tokens
    assert any(warm_tokens & set(r["input_ids"]) for r in rows)


def test_held_out_items_rows_are_not_trained_at_all(tmp_path, monkeypatch):
    """A held-out item does not exist yet for training: no loss term involves its ID token, neither as a wrong
    answer in the ID softmax nor in the vocabulary softmax of the title rows' text, so its rows end as they began
    (no weight decay here), while the warm items' output rows move. The validation ranking during training never
    ranks it."""
    import torch

    import genrec.training as training

    run, cfg = make_run(
        tmp_path,
        "coldrows",
        [
            "ids.embedding=text",
            "ids.scheme=atomic",
            "data.cold_items=0.15",
            "train.title_rows=0.5",
            "train.item_text_rows=0.5",
            "train.weight_decay=0",
            "train.max_steps=8",
            "train.save_steps=4",
            "train.select_metric=ndcg@10",
            "train.early_stopping_patience=5",
        ],
    )
    start: dict[str, torch.Tensor] = {}
    prepare, in_memory = training.prepare_model, training.in_memory_recommender
    ranked_with: list = []

    def recording_prepare(*a, **kw):
        model, tok = prepare(*a, **kw)
        start["in"] = model.get_input_embeddings().weight.detach().clone()
        start["out"] = model.get_output_embeddings().weight.detach().clone()
        return model, tok

    def recording_recommender(*a, **kw):
        rec = in_memory(*a, **kw)
        ranked_with.append(rec)
        return rec

    monkeypatch.setattr(training, "prepare_model", recording_prepare)
    monkeypatch.setattr(training, "in_memory_recommender", recording_recommender)
    train(run, cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run.merged_dir)
    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    ids, cold = run.load_ids(), run.cold_items()
    cold_rows = tok.convert_tokens_to_ids([ids.item_string(i) for i in cold])
    warm_rows = tok.convert_tokens_to_ids([ids.item_string(i) for i in range(len(ids)) if i not in set(cold)])
    out = model.get_output_embeddings().weight.detach()
    assert torch.equal(out[cold_rows], start["out"][cold_rows])
    assert torch.equal(model.get_input_embeddings().weight.detach()[cold_rows], start["in"][cold_rows])
    assert not torch.equal(out[warm_rows], start["out"][warm_rows])
    assert ranked_with and all(rec.held_out == set(cold) for rec in ranked_with)
    warm_user = next(ex for ex in leave_one_out(run.load_data(), "valid") if ex.target not in set(cold))
    trie = ranked_with[0].candidate_trie(RankRequest(warm_user.history, cfg.ranking))
    ranked = {item for _, item in trie}
    assert ranked and not ranked & set(cold)


def test_the_training_softmax_leaves_out_the_tokens_only_held_out_items_use(tiny_lm):
    import torch

    from genrec.id_softmax import group_softmax, softmax_groups
    from genrec.ids import ItemIds

    atomic = ItemIds("atomic", np.arange(6)[:, None], [6])
    assert atomic.tokens_only_of([1, 4]) == {"<item_1>", "<item_4>"} and atomic.tokens_only_of([]) == set()
    semantic = ItemIds("semantic", [[0, 0], [0, 1], [1, 0], [2, 0]], [3, 2])
    assert semantic.tokens_only_of([3]) == {"<a_2>"}  # its <b_0> is other items' too
    assert semantic.tokens_only_of([2, 3]) == {"<a_1>", "<a_2>"}
    assert softmax_groups(semantic.level_tokens(), "ids", leave_out={"<a_2>"}) == [
        ["<a_0>", "<a_1>", "<b_0>", "<b_1>"]
    ]
    assert softmax_groups(semantic.level_tokens(), "level", leave_out={"<a_2>"}) == [
        ["<a_0>", "<a_1>"],
        ["<b_0>", "<b_1>"],
    ]
    assert softmax_groups(semantic.level_tokens(), "full", leave_out={"<a_2>"}) is None
    model, tok, _ = tiny_lm
    ids = ItemIds("semantic", [[c] * 4 for c in range(4)], [4, 4, 4, 4])  # the fixture's ID tokens
    gone = ids.tokens_only_of([0])
    assert gone == {"<a_0>", "<b_0>", "<c_0>", "<d_0>"}
    groups = softmax_groups(ids.level_tokens(), "ids", leave_out=gone)
    softmax = group_softmax(groups, tok, masked=gone)
    head = model.get_output_embeddings()
    states = torch.randn(3, head.weight.shape[1])
    warm = tok.convert_tokens_to_ids(ids.item_tokens(1)[0])
    text = tok.convert_tokens_to_ids(tok.tokenize("hello")[0])
    model.zero_grad()
    lp, entropy, _ = softmax.label_fields(states, head, torch.tensor([warm, text, warm]))
    lp.sum().backward()
    rows = tok.convert_tokens_to_ids(sorted(gone))
    assert torch.isfinite(entropy).all() and torch.isfinite(lp).all()
    assert head.weight.grad[rows].abs().sum() == 0 and head.weight.grad[warm].abs().sum() > 0
    model.zero_grad()
    unmasked = group_softmax(softmax_groups(ids.level_tokens(), "ids"), tok)
    unmasked.label_fields(states, head, torch.tensor([warm, text, warm]))[0].sum().backward()
    assert head.weight.grad[rows].abs().sum() > 0  # what training did before: every step lowered them
    model.zero_grad()


def test_cold_and_need_protocols_report_what_they_compare(text_run):
    run, cfg = text_run
    if not run.merged_dir.is_dir():
        train(run, cfg)
    rec = Recommender.load(run, device="cpu")
    cold = evaluate(run, apply_overrides(cfg, ["eval.protocol=cold"]), rec=rec, progress=False)
    cold_rows = set(run.cold_items())
    assert cold["users"] == sum(s[-1] in cold_rows for s in rec.data.sequences)
    assert set(cold["results"]) == {"genrec", "popularity", "retriever"}
    assert set(cold["not_comparable"]) == {"markov"}
    assert cold["results"]["popularity"]["recall@10"] == 0.0  # held-out items have no interactions
    assert (run / "eval_test_cold.json").is_file() and (run / "report_test_cold.md").is_file()
    need = evaluate(run, apply_overrides(cfg, ["eval.protocol=need"]), rec=rec, progress=False)
    assert {"genrec", "genrec_history_alone", "retriever_need"} <= set(need["results"])
    assert "genrec_history_alone" in need["genrec_vs"] and need["template"] == "need"
    saved = json.loads((run / "eval_test_need.json").read_text())
    assert saved["eval_protocol"] == "need"


def test_held_out_atomic_rows_are_placed_by_the_map_the_warm_items_trained_along(text_run):
    """Warm rows made an exact linear function of their start vectors: the held-out rows land on the same function
    of theirs (model.cold_rows=mapped), and stay as they are with model.cold_rows=start."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genrec.training import id_init_vectors, place_cold_rows

    run, cfg = text_run
    if not run.merged_dir.is_dir():
        train(run, cfg)
    model = AutoModelForCausalLM.from_pretrained(run.merged_dir)
    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    cfg = apply_overrides(cfg, ["model.id_init=items", "model.cold_rows=mapped"])
    ids = run.load_ids()
    vectors = id_init_vectors(run, cfg, ids, model, tok, titles=None)
    names = sorted(vectors)
    x = torch.tensor(np.stack([vectors[n] for n in names]), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(x.shape[1], x.shape[1], generator=gen), torch.randn(x.shape[1], generator=gen)
    rows = tok.convert_tokens_to_ids(names)
    cold_tokens = {ids.item_string(i) for i in run.cold_items()}
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[rows] = x @ a + b
        for n in cold_tokens:
            emb[tok.convert_tokens_to_ids(n)] = 0.0
    before = emb.detach().clone()
    assert place_cold_rows(run, apply_overrides(cfg, ["model.cold_rows=start"]), model, tok) is None
    assert torch.equal(emb.detach(), before)
    record = place_cold_rows(run, cfg, model, tok)
    assert record is not None and record["items"] == len(cold_tokens) > 0
    assert record["input"]["held_out_cosine"] > 0.99 and "output" not in record  # tied rows: one map
    assert run.meta()["cold_rows"] == record
    for n in cold_tokens:
        want = x[names.index(n)] @ a + b
        got = emb[tok.convert_tokens_to_ids(n)].detach()
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99
    warm = [r for n, r in zip(names, rows, strict=True) if n not in cold_tokens]
    assert torch.equal(emb.detach()[warm], before[warm])  # warm rows untouched


def trained_recommender(text_run) -> Recommender:
    """The module's run, trained once (by whichever test needs it first), loaded on the CPU."""
    run, cfg = text_run
    if not run.merged_dir.is_dir():
        train(run, cfg)
    return Recommender.load(run, device="cpu")


def test_free_text_beside_a_history_reaches_the_prompt_and_retrieves_candidates(text_run):
    rec = trained_recommender(text_run)
    hist = rec.user_history(rec.data.users[0])[-3:]
    need = "looking for something like: " + " ".join(rec.catalog.titles[0].split()[:2])
    with_text = RankRequest(list(hist), options=RankingOptions(n_items=5, n_candidates=10), query=need)
    alone = RankRequest(list(hist), options=RankingOptions(n_items=5, n_candidates=10))
    prepared = rec.prepare([with_text, alone])
    assert need in with_text.messages[-1]["content"] and need not in alone.messages[-1]["content"]
    text_only = set(rec.text_retrieved_many([need], n=[10], exclude=[hist])[0])
    assert text_only <= set(prepared.retrieved[0]) and set(prepared.retrieved[1]) <= set(
        prepared.retrieved[0]
    )
    (recs,) = rec.rank_histories([[]], RankingOptions(n_items=5), queries=[need])
    assert len(recs) == 5 and len({r.item for r in recs}) == 5


def test_without_items_leaves_data_alone_when_nothing_is_held_out(small_data):
    assert without_items(small_data, []) is small_data
    assert isinstance(without_items(small_data, [0]), Interactions)


def test_need_fusion_probe_at_weight_zero_is_the_lm_and_names_the_retriever_alone(text_run):
    """bench.need_fusion: at weight 0 each user's NDCG@10 is the LM's own top 10 given history + need, and its
    `retriever_need` is the retriever alone on the need over the unseen items, as `evaluate --protocol need` ranks
    them."""
    from bench.need_fusion import GRID, ndcg_by_weight
    from genrec.evaluation import need_queries, need_retriever_lists
    from genrec.evaluation.metrics import user_metrics

    run, cfg = text_run
    if not run.merged_dir.is_dir():
        train(run, cfg)
    rec = Recommender.load(run, device="cpu")
    got = ndcg_by_weight(rec, "test", 12)  # sets the run's text weight to 0: the LM alone, as below
    assert set(got) == {f"{w:g}" for w in GRID} | {"retriever_need"}
    examples = leave_one_out(rec.data, "test")[:12]
    needs = need_queries(rec.data, examples, rec.cfg)
    top = rec.rank_histories(
        [ex.history for ex in examples], rec.cfg.ranking.with_(n_items=10, candidates="all"), queries=needs
    )
    lm = [
        user_metrics([r.item for r in recs], ex.target, [10])["ndcg@10"]
        for recs, ex in zip(top, examples, strict=True)
    ]
    assert np.allclose(got["0"], lm)
    alone = need_retriever_lists(rec, examples, needs, k=10)
    assert np.allclose(
        got["retriever_need"],
        [user_metrics(a, ex.target, [10])["ndcg@10"] for a, ex in zip(alone, examples, strict=True)],
    )


def test_free_text_score_is_fused_into_the_ranking_of_a_text_request_only(text_run):
    """retrieval.text_weight: a request with free text has its ranked items reordered by the LM's log-probability +
    weight x log-softmax of the text's cosine with each item; weight 0 keeps the LM's order, a very large weight
    gives the text's own order, and a request without text is untouched by it. With candidates=all the engine
    returns the LM's first RankingOptions.MAX_ITEMS (here the whole catalogue), whatever the weight."""
    from genrec.retrieval import fuse

    rec = trained_recommender(text_run)
    hist = rec.user_history(rec.data.users[1])[-3:]
    need = "looking for " + " ".join(rec.catalog.titles[3].split()[:2])
    everything = RankingOptions(n_items=RankingOptions.MAX_ITEMS, candidates="all")
    rec.text_weight = 0.0
    (lm,) = rec.rank_histories([hist], everything, queries=[need])
    unseen = len(rec.catalog) - len(set(hist) | rec.held_out)
    assert len(lm) == unseen  # every item the fusion may reorder, though this request asks for no fusion
    items = [r.item for r in lm]
    (vec,) = rec.encode_text([need])
    cos = rec.text_cosines(vec, items)
    for w in (2.0, 1e6):
        rec.text_weight = w
        (got,) = rec.rank_histories([hist], everything.with_(n_items=10), queries=[need])
        want = np.argsort(-fuse(np.array([r.score for r in lm]), cos, w), kind="stable")[:10]
        assert [r.item for r in got] == [items[j] for j in want]
    assert [r.item for r in got][:3] == [r.item for r in rec.retrieve_text(need, n_items=3, exclude=hist)]
    (plain,) = rec.rank_histories([hist], everything.with_(n_items=10))
    rec.text_weight = 0.0
    assert [r.item for r in plain] == [
        r.item for r in rec.rank_histories([hist], everything.with_(n_items=10))[0]
    ]


def test_text_weight_is_chosen_on_the_validation_need_protocol_recorded_and_loaded(text_run, tmp_path):
    """retrieval.text_weight=auto: `choose_text_weight` ranks the validation users given their validation item's
    need once, fuses the text at each weight of retrieval.text_grid, keeps the best (ties: the smaller), records it
    in run.json, and a Recommender loaded afterwards ranks text requests with it; `evaluate --protocol need` reports
    it. An unchosen weight leaves text requests to the LM (and says so)."""
    import shutil

    from genrec.evaluation import choose_text_weight, need_queries, text_fused_validation_users
    from genrec.run import RunDir

    run, cfg = text_run
    if not run.merged_dir.is_dir():
        train(run, cfg)
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.path, copy.path)
    meta = copy.meta()
    meta.get("retrieval", {}).pop("text_fusion", None)
    (copy.path / "run.json").write_text(json.dumps(meta))
    cfg = apply_overrides(cfg, ["retrieval.tune_users=24", "retrieval.text_grid=[0,2,8,64]"])
    copy.save_config(cfg)
    rec = Recommender.load(copy, device="cpu")
    assert rec.text_weight is None
    info = choose_text_weight(rec, cfg, progress=False)
    grid = info["valid_ndcg@10"]
    assert set(grid) == {"0", "2", "8", "64"} and info["users"] == 24
    best = max(grid.values())
    assert info["weight"] == min(float(w) for w, v in grid.items() if v == best)
    assert copy.meta()["retrieval"]["text_fusion"]["weight"] == info["weight"] == rec.text_weight
    # the chosen weight's validation figure is what the product's ranking gives those users
    valid = leave_one_out(rec.data, "valid")[:24]
    needs = need_queries(rec.data, valid, cfg)
    again = Recommender.load(copy, device="cpu")
    assert again.text_weight == info["weight"]
    top = again.rank_histories(
        [ex.history for ex in valid], again.cfg.ranking.with_(n_items=10), queries=needs
    )
    from genrec.evaluation.metrics import user_metrics

    ndcg = [
        user_metrics([r.item for r in t], ex.target, [10])["ndcg@10"]
        for t, ex in zip(top, valid, strict=True)
    ]
    assert np.isclose(np.mean(ndcg), grid[f"{info['weight']:g}"], atol=1e-4)
    per_user = text_fused_validation_users(again, valid, cfg, [info["weight"]], progress=False)
    assert np.allclose(per_user[f"{info['weight']:g}"], ndcg)
    need = evaluate(
        copy, apply_overrides(cfg, ["eval.protocol=need", "eval.max_users=8"]), rec=again, progress=False
    )
    assert need["text_fusion"]["weight"] == info["weight"]
    assert "The need's text score" in (copy.path / "report_test_need.md").read_text()
    train(
        copy, apply_overrides(cfg, ["train.max_steps=2"])
    )  # a new model: the weight chosen for the old one goes
    assert "text_fusion" not in copy.meta().get("retrieval", {})
    assert Recommender.load(copy, device="cpu").text_weight is None
