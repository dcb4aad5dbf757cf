"""One ranking-options type and one history resolution behind every front end (server, batch rows, the
template preview, `genrec recommend` / `generate`): the same input means the same thing everywhere."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from genrec.batch.input import parse_row
from genrec.cli import app
from genrec.config import RankingOptionError, RankingOptions
from genrec.errors import GenrecError
from genrec.recommender import QueryProblem, Recommender
from genrec.serve.protocol import APIError, ChatCompletionRequest
from genrec.serve.service import RecService, ServeLimits


@pytest.fixture(scope="module")
def rec(trained_run):
    return Recommender.load(trained_run[0], device="cpu")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n_items": 0}, "n_items"),
        ({"n_items": 2.5}, "n_items"),
        ({"n_items": True}, "n_items"),
        ({"n_candidates": 0}, "n_candidates"),
        ({"n_candidates": RankingOptions.MAX_CANDIDATES + 1}, "n_candidates"),
        ({"beam_width": 0}, "beam_width"),
        ({"candidates": "some"}, "candidates"),
    ],
)
def test_ranking_options_refuse_a_bad_value_naming_its_field(fields, field):
    with pytest.raises(RankingOptionError, match=field) as e:
        RankingOptions(**fields)
    assert e.value.field == field
    with pytest.raises(RankingOptionError):  # the same check when a front end applies a caller's value
        RankingOptions().with_(**fields)


def test_ranking_options_are_frozen_and_with_keeps_what_is_left_unset():
    base = RankingOptions(n_items=5, candidates="all", n_candidates=30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.n_items = 3  # type: ignore[misc]
    assert base.with_(n_items=None, candidates=None, n_candidates=None) == base
    assert base.with_(n_items=7) == RankingOptions(7, "all", 30)
    with pytest.raises(TypeError, match="mode"):
        base.with_(mode="all")


def test_every_front_end_starts_from_the_runs_evaluated_options(rec):
    """A request that sets nothing ranks what the run's evaluation ranked (and tuned its fusion weight on)."""
    cfg = rec.cfg
    assert cfg.ranking == RankingOptions(10, cfg.eval.candidates, cfg.eval.n_candidates)
    service = RecService(rec, model_name="m")
    bare = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert service.ranking(bare) == cfg.ranking
    asked = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "n_items": 4,
            "candidates": "retriever",
            "n_candidates": 17,
        }
    )
    assert service.ranking(asked) == RankingOptions(4, "retriever", 17)


def test_one_resolution_gives_the_same_history_to_the_server_the_batch_job_and_the_preview(rec):
    user = rec.data.users[3]
    full = rec.user_history(user, split="full")
    titles = [rec.catalog.titles[i] for i in full[-3:]]
    ids = [rec.catalog.item_ids[i] for i in full[-3:]]
    service = RecService(rec, model_name="m", limits=ServeLimits(max_history=512))

    def chat(**extra):
        body = {"model": "m", "messages": [{"role": "user", "content": extra.pop("content", "")}], **extra}
        req = ChatCompletionRequest.model_validate(body)
        return service.parse(req, text=req.messages[-1].text(), user=req.user)

    def row(obj):
        return parse_row(rec, 1, obj, None)

    # a history by titles, ids or ID strings: the same rows everywhere
    by_titles = rec.resolve_query(history=titles)
    assert by_titles.history == full[-3:]
    assert chat(history=titles).history == row({"history": ids}).history == full[-3:]
    assert chat(content=", ".join(ids)).history == full[-3:]  # the chat message as a list of items
    assert (
        service.resolve_query(user=None, history=[rec.ids.item_string(i) for i in full[-3:]]).history
        == (full[-3:])
    )
    # a known user: the whole history when serving, as of the test split for `genrec recommend`
    assert chat(user=user).history == row({"user": user}).history == full
    assert rec.resolve_query(user=user, split="test").history == full[:-1]
    # text beside a history is the need; text alone is a new user
    need = "something for rainy days"
    q = chat(user=user, content=need)
    r = row({"user": user, "text": need})
    assert (q.history, q.text) == (r.history, r.query) == (full, need)
    alone = row({"text": f"  {need} "})
    assert (alone.history, alone.query) == ([], need)


@pytest.mark.parametrize(
    ("inputs", "field", "code"),
    [
        ({"history": ["no-such-item"]}, "history", "unknown_items"),
        ({"history": 5}, "history", "history_not_a_list"),
        ({"history": []}, "history", "empty_history"),
        ({"user": "stranger"}, "user", "unknown_user"),
        ({}, "history", "no_user_or_history"),
        ({"text": 7}, "text", "text_not_a_string"),
    ],
)
def test_a_query_problem_names_its_input_the_same_way_in_each_front_end(rec, inputs, field, code):
    with pytest.raises(QueryProblem) as e:
        rec.resolve_query(**inputs)
    assert (e.value.field, e.value.code) == (field, code)
    reject = parse_row(rec, 9, inputs, None)
    assert reject.kind == code.replace("_", " ") and reject.reason == str(e.value)
    if field != "text":  # the server's request schema refuses a non-string text itself
        service = RecService(rec, model_name="m")
        with pytest.raises(APIError) as api:
            service.resolve_query(user=inputs.get("user"), history=inputs.get("history"))
        assert (api.value.status, api.value.body()["error"]["code"]) == (400, code)


def test_a_user_beside_a_history_must_be_known_unless_it_only_labels_a_batch_row(rec):
    history = [rec.catalog.item_ids[0]]
    with pytest.raises(QueryProblem, match="unknown user 'someone-new'"):
        rec.resolve_query(user="someone-new", history=history)
    labelled = rec.resolve_query(user="someone-new", history=history, strict_user=False)
    assert labelled.history == [0] and labelled.user == "someone-new"
    row = parse_row(rec, 1, {"user": "someone-new", "history": history}, None)
    assert row.user == "someone-new" and row.history == [0]


def test_the_server_refuses_a_history_over_its_limit_naming_the_parameter(rec):
    service = RecService(rec, model_name="m", limits=ServeLimits(max_history=2))
    user = next(u for u in rec.data.users if len(rec.user_history(u, split="full")) > 2)
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": ""}], "user": user}
    )
    with pytest.raises(APIError) as e:
        service.parse(req, text="", user=user)
    assert e.value.body()["error"]["code"] == "history_too_long"


def test_the_cli_names_a_bad_ranking_flag_before_any_model_loads(trained_run, tmp_path):
    run = trained_run[0]
    users = tmp_path / "users.jsonl"
    users.write_text('{"user": "u"}\n')
    runner = CliRunner()
    out = str(tmp_path / "o.jsonl")
    for args, flag in (
        (["generate", "--run", str(run.path), "--input", str(users), "--output", out, "-n", "0"], "-n"),
        (["recommend", "--run", str(run.path), "--text", "x", "--candidates", "some"], "--candidates"),
        (["recommend", "--run", str(run.path), "--text", "x", "--n-candidates", "0"], "--n-candidates"),
    ):
        res = runner.invoke(app, args)
        assert isinstance(res.exception, GenrecError), res.output
        assert str(res.exception).startswith(f"{flag}: "), res.exception
    assert not (tmp_path / "o.jsonl.parts").exists()
