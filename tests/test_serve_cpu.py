"""Issue 26's CPU accounting and fast responses: CPU by stage on /metrics, the engine's busy seconds, response
bodies built without pydantic (valid against genrec.serve.protocol's models), and bench.load's arithmetic."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from genrec.cpu_time import STAGES, StageClock
from genrec.recommender import Recommendation, Recommender
from genrec.serve import encode
from genrec.serve.app import create_app
from genrec.serve.protocol import ChatCompletionResponse, CompletionResponse, RecommendedItem
from genrec.serve.service import RecService, recommended_items
from tests.test_server import LiveServer

RECS = [Recommendation(i, f"i{i}", f"Title {i} é", -0.123456789 * i) for i in range(4)]


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_stage_clock_counts_each_threads_cpu_not_its_waits():
    """CPU burnt inside a stage counts, from any thread; sleeping inside one does not; an unknown stage is refused."""
    clock = StageClock()
    with clock.stage("render"):
        _spin(0.05)
    with clock.stage("retrieve"):
        time.sleep(0.2)

    def other() -> None:
        with clock.stage("render"):
            _spin(0.05)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    got = clock.seconds()
    assert set(got) == set(STAGES)
    assert 0.1 <= got["render"] < 0.2 and got["retrieve"] < 0.05 and got["encode"] == 0
    with pytest.raises(ValueError, match="unknown stage 'forward'"):
        clock.add("forward", 1)


def test_encoded_bodies_are_the_protocols_models():
    """The orjson bodies validate as genrec.serve.protocol's responses and carry what the pydantic path carried."""
    template = {"name": "t", "version": 2, "hash": "h", "trained_hash": "h", "matches_training": True}
    chat = ChatCompletionResponse.model_validate_json(
        encode.chat_completion(
            model="m", content="1. x", recs=RECS, prompt_tokens=7, completion_tokens=16, template=template
        )
    )
    assert chat.recommendations == recommended_items(RECS)
    assert chat.choices[0].message.content == "1. x" and chat.template == template
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (7, 16, 23)
    assert chat.id.startswith("chatcmpl-") and abs(chat.created - time.time()) < 5
    plain = CompletionResponse.model_validate_json(
        encode.completion(model="m", text="t", recs=RECS, prompt_tokens=1, completion_tokens=2)
    )
    assert plain.recommendations == recommended_items(RECS) and plain.choices[0].text == "t"
    assert [RecommendedItem(**d) for d in encode.recommended(RECS)] == recommended_items(RECS)


@pytest.fixture(scope="module")
def served(trained_run):
    rec = Recommender.load(trained_run[0], device="cpu")
    with LiveServer(create_app(RecService(rec, model_name="tiny-run"))) as s:
        yield s, rec


def _metrics(url: str) -> dict[str, float]:
    from bench.load import scrape

    return scrape(url)


def test_metrics_count_cpu_by_stage_and_engine_busy_seconds(served):
    """After requests on both endpoints: every stage of the chat path has CPU time on /metrics, the engine's
    busy seconds and the process's CPU grew, and the replies are the protocol's models."""
    server, rec = served
    before = _metrics(server.url)
    hist = [rec.catalog.item_ids[i] for i in rec.user_history(rec.data.users[3])[-3:]]
    for path, body in (
        (
            "/v1/chat/completions",
            {"model": "tiny-run", "messages": [{"role": "user", "content": ", ".join(hist)}]},
        ),
        ("/v1/completions", {"model": "tiny-run", "prompt": ", ".join(hist)}),
    ):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        model = ChatCompletionResponse if "chat" in path else CompletionResponse
        assert len(model.model_validate_json(r.content).recommendations or []) == 10
    after = _metrics(server.url)
    grew = {k for k in after if after[k] > before.get(k, 0.0)}
    assert {f"stage:{s}" for s in STAGES} <= grew  # parse, render, ..., encode: each measured
    assert {"genrec_engine_busy_seconds_total", "process_cpu_seconds_total"} <= grew


def test_load_bench_splits_clients_and_reads_the_servers_counters(served):
    """bench.load: a level's clients and requests split over processes (one client each at least); one
    request against the live server is timed and valid; per-request server figures from counter deltas."""
    from bench.load import Job, Target, one, server_side, shares

    server, rec = served
    tg = Target("genrec", "tiny-run", 5, set(rec.catalog.item_ids))
    parts = shares(server.url, tg, [], clients=10, requests=101, processes=4, max_s=5)
    assert [(p.clients, p.requests) for p in parts] == [(3, 26), (3, 25), (2, 25), (2, 25)]
    assert [p.clients for p in shares(server.url, tg, [], clients=1, requests=9, processes=4, max_s=5)] == [1]
    assert len({p.seed for p in parts}) == 4
    job = Job([rec.catalog.item_ids[i] for i in rec.user_history(rec.data.users[3])[-3:]])

    async def go() -> tuple[float, float, str | None]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await one(client, tg, job)

    latency, valid, err = asyncio.run(go())
    assert err is None and valid == 1.0 and latency > 0
    bad = Target("genrec", "no-such-model", 5, tg.catalog)

    async def refused() -> tuple[float, float, str | None]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await one(client, bad, job)

    assert asyncio.run(refused())[1:] == (0.0, "HTTP 400")
    before = {"genrec_engine_busy_seconds_total": 1.0, "process_cpu_seconds_total": 10.0, "stage:rank": 2.0}
    after = {
        "genrec_engine_busy_seconds_total": 3.0,
        "process_cpu_seconds_total": 12.0,
        "stage:rank": 3.0,
        "stage:encode": 0.5,
    }
    got = server_side(before, after, wall=4.0, served=100)
    assert got["engine_busy"] == 0.5 and got["server_cpu_ms_per_request"] == 20.0
    assert got["stage_cpu_ms_per_request"] == {"rank": 10.0, "encode": 5.0}
    assert got["outside_forward_cpu_ms_per_request"] == 10.0 and got["unstaged_cpu_ms_per_request"] == 5.0
    assert server_side(before, {}, wall=1.0, served=1) == {}


def test_template_lookups_trust_the_disk_for_recheck_s(tmp_path, monkeypatch):
    """With recheck_s, repeated lookups of the active template make no stat; a save through the same store is
    seen at once, another store's (another process) only after recheck_s; with 0 (the default), at once."""
    import os

    from genrec.templates.prompt_store import TemplateStore
    from genrec.templates.prompts import PROMPTS_DIR
    from tests.test_templates import EDITED

    server = TemplateStore(tmp_path / "t", shipped=[PROMPTS_DIR], recheck_s=0.3)
    eager, cli = (TemplateStore(tmp_path / "t", shipped=[PROMPTS_DIR]) for _ in range(2))
    assert server.template("default")[0].version == eager.template("default")[0].version == 1
    stats = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a[0]) or real(*a, **k))
    for _ in range(5):
        server.template("default")
    assert stats == []
    monkeypatch.setattr(os, "stat", real)
    cli.save("default", EDITED, author="cli", base_version=1)
    assert eager.active("default").version == 2  # recheck_s 0: the disk every time
    assert server.active("default").version == 1  # trusted for up to 0.3 s
    time.sleep(0.35)
    assert server.active("default").version == 2
    server.save("default", EDITED.replace("(edited)", "(again)"), author="api", base_version=2)
    v, t = server.template("default")
    assert v.version == 3 and "(again)" in t.body  # its own save: at once


def test_serve_cpu_bench_reports_every_stage_and_the_lookups_disk_calls(served):
    """bench.serve_cpu on the tiny run: every stage of a chat request gets CPU time; the encoders agree; the
    template lookups stat files when the disk is checked every time and not within template_recheck_s."""
    from bench.serve_cpu import _chat_body, asgi_stack, encode_before_after, lookups_before_after, stages

    _, rec = served
    service = RecService(rec, model_name="m")
    texts = [", ".join(rec.catalog.item_ids[i] for i in rec.user_history(u)[-3:]) for u in rec.data.users[:8]]
    split = stages(service, texts, 4)
    assert set(split) == set(STAGES) and all(split[s] > 0 for s in STAGES)
    assert set(encode_before_after(RECS, 3)) == {"before_ms", "after_ms", "ratio"}
    found = lookups_before_after(rec, 3)
    assert found["before"]["fs_calls_per_request"]["stat"] > 0
    assert found["after"]["fs_calls_per_request"] == {"stat": 0, "open": 0}
    stack = asgi_stack(service, 3, "k", _chat_body(texts[0]))
    assert set(stack) == {"models_ms", "unauthenticated_ms", "chat_fast_routes_ms", "chat_fastapi_route_ms"}
    assert all(v > 0 for v in stack.values())
