"""A real server (uvicorn on 127.0.0.1, random port) driven by the official openai client."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest

from genrec.recommender import Recommender
from genrec.serve.app import create_app
from genrec.serve.service import RecService, ServeLimits

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, app, http=None) -> None:
        import uvicorn

        self.port = free_port()
        from genrec.serve.main import uvicorn_options

        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", **uvicorn_options(http)
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def rec(trained_run):
    return Recommender.load(trained_run[0], device="cpu")


@pytest.fixture(scope="module")
def server(rec):
    service = RecService(rec, model_name="tiny-run", limits=ServeLimits(max_history=50))
    with LiveServer(create_app(service, api_keys=[KEY])) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def history_of(rec, k=3):
    return rec.user_history(rec.data.users[5])[-k:]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-run"]


def test_chat_with_history_returns_valid_distinct_items(client, rec):
    hist = history_of(rec)
    refs = [rec.catalog.item_ids[i] for i in hist]
    resp = client.chat.completions.create(
        model="tiny-run", messages=[{"role": "user", "content": ", ".join(refs)}], extra_body={"n_items": 6}
    )
    lines = resp.choices[0].message.content.splitlines()
    assert len(lines) == 6 and lines[0].startswith("1. ")
    recs = resp.model_extra["recommendations"]
    ids = [r["item_id"] for r in recs]
    assert len(set(ids)) == 6 and all(i in rec.catalog.index for i in ids) and not set(ids) & set(refs)
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens == 6 * rec.ids.depth


def test_history_forms_agree(client, rec):
    hist = history_of(rec)
    by_ids = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": ""}],  # no text beside the history: the history alone
        extra_body={"history": [rec.catalog.item_ids[i] for i in hist], "n_items": 5, "candidates": "all"},
    )
    by_sid = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": "".join(rec.ids.item_string(i) for i in hist)}],
        extra_body={"n_items": 5, "candidates": "all"},
    )
    titles = "\n".join(rec.catalog.titles[i] for i in hist)
    by_title = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": titles}],
        extra_body={"n_items": 5, "candidates": "all"},
    )
    a, b, c = (x.choices[0].message.content for x in (by_ids, by_sid, by_title))
    assert a == b == c


def test_known_user_and_json_output(client, rec):
    user = rec.data.users[2]
    resp = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": "what next?"}],
        user=user,
        response_format={"type": "json_object"},
        extra_body={"n_items": 4},
    )
    data = json.loads(resp.choices[0].message.content)
    assert [x["rank"] for x in data["items"]] == [1, 2, 3, 4]
    seen = {rec.catalog.item_ids[i] for i in rec.data.sequences[rec.data.users.index(user)]}
    assert not {x["item_id"] for x in data["items"]} & seen


def test_streaming_matches_non_streaming(client, rec):
    body = {
        "model": "tiny-run",
        "messages": [{"role": "user", "content": rec.catalog.item_ids[history_of(rec)[0]]}],
        "extra_body": {"n_items": 5},
    }
    full = client.chat.completions.create(**body).choices[0].message.content
    stream = client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_endpoint(client, rec):
    resp = client.completions.create(
        model="tiny-run", prompt=rec.catalog.item_ids[history_of(rec)[0]], extra_body={"n_items": 3}
    )
    assert len(resp.choices[0].text.splitlines()) == 3


def test_explore_diversifies_but_stays_valid(client, rec):
    hist = [rec.catalog.item_ids[i] for i in history_of(rec)]
    resp = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": "x"}],
        extra_body={"history": hist, "n_items": 5, "explore": 0.9},
    )
    ids = [r["item_id"] for r in resp.model_extra["recommendations"]]
    assert len(set(ids)) == 5 and not set(ids) & set(hist)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "other"}, "unknown model 'other'"),
        ({"extra_body": {"history": ["nope-1", "nope-2"]}}, "unknown item.*'nope-1', 'nope-2'"),
        ({"extra_body": {"history": []}, "messages": [{"role": "user", "content": " "}]}, "'history': empty"),
        ({"extra_body": {"history": ["I00001"] * 51}}, "limit is 50"),
        ({"n": 2}, "only n=1"),
        ({"extra_body": {"n_items": 0}}, "n_items"),
        ({"extra_body": {"template": "../../etc/passwd", "history": ["I00001"]}}, "invalid template name"),
        ({"extra_body": {"candidates": "some"}}, "candidates"),
        ({"messages": [{"role": "user", "content": ""}]}, "no user, history or text"),
    ],
)
def test_client_errors_are_400(client, kwargs, match):
    body = {"model": "tiny-run", "messages": [{"role": "user", "content": "I00001"}]}
    body.update(kwargs)
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(**body)


def prompts_sent(rec, monkeypatch) -> list:
    """The chat messages of every prompt the engine tokenizes from now on."""
    sent: list = []
    encode = rec.engine.encode_many

    def record(messages):
        sent.extend(messages)
        return encode(messages)

    monkeypatch.setattr(rec.engine, "encode_many", record)
    return sent


def test_free_text_alone_is_ranked_by_the_model(client, rec, monkeypatch):
    """A new user's words go to the LM in the need template; without text embeddings (this run's are
    collaborative) it ranks the whole catalogue."""
    sent = prompts_sent(rec, monkeypatch)
    resp = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": "something cosy to read"}],
        extra_body={"n_items": 4},
    )
    ids = [r["item_id"] for r in resp.model_extra["recommendations"]]
    assert len(set(ids)) == 4 and all(i in rec.catalog.index for i in ids)
    assert any("something cosy to read" in m["content"] for msgs in sent for m in msgs)


def test_free_text_beside_a_history_reaches_the_prompt(client, rec, monkeypatch):
    hist = [rec.catalog.item_ids[i] for i in history_of(rec)]
    sent = prompts_sent(rec, monkeypatch)
    with_text = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": "a gift for a coffee lover"}],
        extra_body={"history": hist, "n_items": 5, "candidates": "all"},
    )
    prompt = "\n".join(m["content"] for m in sent[-1])
    assert "a gift for a coffee lover" in prompt
    assert all(rec.ids.item_string(rec.catalog.index[h]) in prompt for h in hist)
    alone = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": ""}],
        extra_body={"history": hist, "n_items": 5, "candidates": "all"},
    )
    assert "a gift for a coffee lover" not in "\n".join(m["content"] for m in sent[-1])
    assert with_text.usage.prompt_tokens > alone.usage.prompt_tokens


def test_idle_keep_alive_connection_outlives_the_clients_expiry(server):
    """A connection idle for longer than httpx's keep-alive expiry (5 s, the `openai` client's) is still
    open: the server must not close connections a client may be about to reuse (uvicorn's default of 5 s
    races with it, and the request sent on a closing connection fails with no response)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read() and conn.sock is not None
    time.sleep(6)
    conn.request("GET", "/health")  # the same socket; raises if the server closed it
    assert conn.getresponse().status == 200
    conn.close()


def test_auth(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_malformed_json_and_fuzz_never_5xx(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    rng = random.Random(0)
    values = [
        None,
        1,
        -5,
        1e9,
        "",
        "x" * 5000,
        [],
        {},
        [1, "a"],
        {"a": 1},
        True,
        "I00001",
        ["I00001", "I00002"],
    ]
    fields = [
        "model",
        "messages",
        "n_items",
        "history",
        "exclude",
        "explore",
        "candidates",
        "n",
        "stream",
        "response_format",
        "user",
        "template",
        "n_candidates",
    ]
    for _ in range(150):
        body = {"model": "tiny-run", "messages": [{"role": "user", "content": "I00001"}]}
        for f in rng.sample(fields, rng.randint(1, 4)):
            body[f] = rng.choice(values)
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = httpx.post(server.url + path, json=body, headers=h, timeout=60)
            assert r.status_code < 500, (path, body, r.text)
            if r.status_code >= 400:
                assert "error" in r.json() and r.json()["error"]["message"]


def test_metrics_exposed(server, client, rec):
    client.chat.completions.create(
        model="tiny-run", messages=[{"role": "user", "content": rec.catalog.item_ids[0]}]
    )
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        "genrec_requests_total",
        "genrec_request_latency_seconds_bucket",
        "genrec_queue_depth",
        "genrec_items_returned_total",
        "genrec_invalid_items_total 0.0",
        "genrec_prompt_tokens_total",
        'genrec_ranked_requests_total{search="exact"}',  # 200 retrieved candidates: exact tree scoring
    ):
        assert name in text, name


def assert_queue_full_gives_429(app, rec):
    """A request to `app`, whose queue takes none, gets 429 with Retry-After (also run on --frontends)."""
    with LiveServer(app) as s:
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": rec.catalog.item_ids[0]}]},
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_queue_full_gives_429_with_retry_after(rec):
    assert_queue_full_gives_429(
        create_app(RecService(rec, model_name="m", limits=ServeLimits(max_queue=0))), rec
    )


def test_concurrent_requests_are_batched_and_valid(server, rec):
    import concurrent.futures

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    def one(i: int) -> list[str]:
        hist = rec.user_history(rec.data.users[i % len(rec.data.users)])[-3:]
        resp = client.chat.completions.create(
            model="tiny-run",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"history": [rec.catalog.item_ids[j] for j in hist], "n_items": 5},
        )
        ids = [r["item_id"] for r in resp.model_extra["recommendations"]]
        assert len(set(ids)) == 5 and not set(ids) & {rec.catalog.item_ids[j] for j in hist}
        return ids

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(48)))
    assert len(results) == 48
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    batches = [ln for ln in text.splitlines() if ln.startswith("genrec_batch_size_count")]
    count = float(batches[0].split()[-1])
    assert count < 48 + 30  # concurrent requests shared engine batches


def test_graceful_shutdown_finishes_in_flight_requests(rec):
    import concurrent.futures

    # The worker holds a batch open for 1.5 s, so all 8 requests are queued when shutdown starts.
    service = RecService(rec, model_name="m", limits=ServeLimits(batch_wait_ms=1500, adaptive_wait=False))
    stopped_engine_with_pending = []  # the engine stops only after the queue drained
    s = LiveServer(
        create_app(service, on_shutdown=lambda: stopped_engine_with_pending.append(service._pending))
    ).__enter__()
    body = {"model": "m", "messages": [{"role": "user", "content": rec.catalog.item_ids[0]}], "n_items": 5}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(httpx.post, s.url + "/v1/chat/completions", json=body, timeout=60) for _ in range(8)
        ]
        deadline = time.time() + 20
        while service._pending < 8 and time.time() < deadline:
            time.sleep(0.01)
        assert service._pending == 8
        s.server.should_exit = True
        codes = [f.result().status_code for f in futures]
    s.thread.join(timeout=60)
    assert codes == [200] * 8 and not s.thread.is_alive()
    assert stopped_engine_with_pending == [0]


def test_warm_up_ranks_the_runs_users_before_the_server_accepts_requests(rec, monkeypatch):
    """ServeLimits.warmup_requests: at start-up, before any connection, that many of the run's users are
    ranked as default requests in batches of 1, 2, 4 and 8 (the CUDA graph shapes on a GPU); then serving
    is as before."""
    batches = []
    rank = rec.rank_requests
    monkeypatch.setattr(rec, "rank_requests", lambda reqs: batches.append(list(reqs)) or rank(reqs))
    service = RecService(rec, model_name="m", limits=ServeLimits(warmup_requests=11))
    with LiveServer(create_app(service)) as s:
        assert [len(b) for b in batches] == [1, 2, 4, 4]  # all of it before the server came up
        assert service.warmed is not None and service.warmed["batches"] == [1, 2, 4, 4]
        assert service.warmed["cuda_graphs"] is None  # a CPU engine has no graphs
        warm = [r for b in batches for r in b]
        assert [r.user for r in warm] == rec.data.users[:11]
        assert all(r.options == rec.cfg.ranking for r in warm)  # the defaults a request gets
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": rec.catalog.item_ids[0]}]},
        )
        assert r.status_code == 200 and len(batches) == 5
    assert RecService(rec, model_name="m").warmed is None  # the library default: no warm-up


def test_batch_window_is_held_open_only_for_busy_traffic(rec):
    """A lone client's request starts at once; requests arriving faster than the window wait to share
    a batch; with adaptive_wait off the window is always held."""
    service = RecService(rec, model_name="m", limits=ServeLimits(batch_wait_ms=5))
    assert not service._should_wait()  # nothing seen yet
    for k in range(5):
        service._note_arrival(10.0 + 0.05 * k)  # one request every 50 ms: one client, one at a time
    assert not service._should_wait()
    for k in range(10):
        service._note_arrival(11.0 + 0.001 * k)  # a burst, 1 ms apart
    assert service._should_wait()
    always = RecService(rec, model_name="m", limits=ServeLimits(batch_wait_ms=5, adaptive_wait=False))
    assert always._should_wait()


# -- hardening (issue 29): every client input a 4xx, bounded bodies, protected internals -----------------
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(server, path, stream):
    """A lone surrogate is valid JSON (`"\\ud800"`) but no text: refused at the protocol boundary, in any
    field, never handed to the tokenizer (it was a 500)."""
    for text in ('"\\ud800"', '"ok \\udfff"', '"\\ud800\\ud800x"'):
        body = {"model": "tiny-run", "stream": stream}
        if path.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": "@@"}]
        else:
            body["prompt"] = "@@"
        raw = json.dumps(body).replace('"@@"', text).encode()
        r = httpx.post(server.url + path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert "not valid Unicode" in r.json()["error"]["message"]
    raw = (
        b'{"model": "tiny-run", "messages": [{"role": "user", "content": "I00001"}], "history": ["\\udc00"]}'
    )
    r = httpx.post(server.url + path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "history.0" in r.json()["error"]["message"]


def test_an_unknown_user_beside_a_history_is_a_400(client, rec):
    refs = [rec.catalog.item_ids[i] for i in history_of(rec)]
    with pytest.raises(openai.BadRequestError, match="unknown user 'nobody-at-all'"):
        client.chat.completions.create(
            model="tiny-run",
            messages=[{"role": "user", "content": "x"}],
            user="nobody-at-all",
            extra_body={"history": refs},
        )
    known = rec.data.users[3]
    ok = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": "x"}],
        user=known,
        extra_body={"history": refs},
    )
    assert ok.model_extra["recommendations"]


def test_an_id_shaped_unknown_item_is_named_not_taken_for_free_text(client, rec):
    """`I99999` alone is refused like `I00012, I99999` (it was taken as a cold-start description)."""
    missing = "I" + "9" * (len(rec.catalog.item_ids[0]) - 1)
    assert missing not in rec.catalog.index
    for content in (missing, f"{rec.catalog.item_ids[0]}, {missing}", f"{missing}\n{missing}"):
        with pytest.raises(openai.BadRequestError, match=f"unknown item.*{missing}"):
            client.chat.completions.create(model="tiny-run", messages=[{"role": "user", "content": content}])


def test_metrics_and_docs_need_a_key_unless_made_public(rec):
    service = RecService(rec, model_name="tiny-run")
    with LiveServer(create_app(service, api_keys=[KEY])) as s:
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc"):
            assert httpx.get(s.url + path).status_code == 401, path
            assert httpx.get(s.url + path, headers=AUTH).status_code == 200, path
        assert httpx.get(s.url + "/health").status_code == 200
    with LiveServer(create_app(service, api_keys=[KEY], public=["metrics", "docs"])) as s:
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert httpx.get(s.url + path).status_code == 200, path
        assert httpx.get(s.url + "/v1/models").status_code == 401
    with pytest.raises(ValueError, match="unknown choice"):
        create_app(service, api_keys=[KEY], public=["everything"])


@pytest.fixture(scope="module")
def strict_server(rec):
    from genrec.serve.http import HTTPLimits

    limits = HTTPLimits(max_body_bytes=8192, body_timeout_s=1.0, header_timeout_s=1.0, max_header_bytes=8192)
    service = RecService(rec, model_name="tiny-run")
    with LiveServer(create_app(service, api_keys=[KEY], http=limits), http=limits) as s:
        yield s


def _raw(port: int, data: bytes, *, wait: float = 5.0) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; what comes back until the server closes it, and when it did."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            return got + b"<still open>", time.monotonic() - started
    return got, time.monotonic() - started


def test_oversized_bodies_get_413_declared_or_not(strict_server):
    big = json.dumps({"model": "tiny-run", "messages": [{"role": "user", "content": "x" * 20_000}]})
    r = httpx.post(
        strict_server.url + "/v1/chat/completions",
        content=big,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # a promise of 100 MB is refused at once, before any of it is read
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n0123456789"
    got, took = _raw(strict_server.port, head)
    assert got.startswith(b"HTTP/1.1 413") and took < 1.0
    # chunked (no length given): counted as it arrives
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    got, _ = _raw(
        strict_server.port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert got.startswith(b"HTTP/1.1 413")
    ok = httpx.post(strict_server.url + "/v1/models", headers=AUTH)  # small bodies still pass the limit
    assert ok.status_code == 405


def test_stalled_bodies_and_headers_are_cut_off(strict_server):
    """A body that stops coming gets 408 and its connection closed; a connection that trickles (or never
    sends) its headers is closed: neither holds the server's memory or sockets for long."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\nContent-Length: 5000\r\n\r\n0123456789"
    got, took = _raw(strict_server.port, head)
    assert got.startswith(b"HTTP/1.1 408") and b"<still open>" not in got and took < 4.0
    got, took = _raw(strict_server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert b"<still open>" not in got and took < 4.0
    got, took = _raw(strict_server.port, b"")
    assert b"<still open>" not in got and took < 4.0
    got, _ = _raw(
        strict_server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"
    )
    assert got.startswith(b"HTTP/1.1 400")
    assert httpx.get(strict_server.url + "/health").status_code == 200


def test_metrics_are_labelled_by_route_not_by_the_path_sent(server):
    """A client sending many distinct paths must not grow one Prometheus series per path."""
    for k in range(3):
        httpx.get(server.url + f"/v1/templates/probe-name-{k}", headers=AUTH)
        httpx.get(server.url + f"/v1/no-such-route-{k}", headers=AUTH)
        httpx.get(server.url + f"/v1/unauthenticated-{k}")
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'endpoint="/v1/templates/{name}"' in text and 'endpoint="unmatched"' in text
    assert 'endpoint="unauthenticated"' in text
    assert "probe-name" not in text and "no-such-route" not in text and "unauthenticated-" not in text


def _counted(metrics: str, endpoint: str, status: str) -> float:
    line = f'genrec_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    found = [x for x in metrics.splitlines() if x.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_middleware_maps_what_escapes_a_route_and_counts_every_v1_response(rec, monkeypatch, caplog):
    """The middleware (pure ASGI since issue 26, no BaseHTTPMiddleware left) does what it did: 401 before routing,
    an exception a route lets through becomes a logged 500 error body, an APIError raised (not returned) out of a
    route keeps its status, and every /v1 response, streamed or not, is counted by route and status and timed."""
    from starlette.middleware.base import BaseHTTPMiddleware

    service = RecService(rec, model_name="tiny-run")
    app = create_app(service, api_keys=[KEY])
    assert not any(
        isinstance(m.cls, type) and issubclass(m.cls, BaseHTTPMiddleware) for m in app.user_middleware
    )
    chat = {"model": "tiny-run", "messages": [{"role": "user", "content": rec.catalog.item_ids[0]}]}
    with LiveServer(app) as s:
        assert httpx.post(s.url + "/v1/chat/completions", json=chat).status_code == 401
        with monkeypatch.context() as m:
            m.setattr(service, "parse", lambda *a, **k: 1 / 0)
            r = httpx.post(s.url + "/v1/chat/completions", json=chat, headers=AUTH)
        assert r.status_code == 500 and r.json()["error"] == {
            "message": "internal error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert "unhandled error on /v1/chat/completions" in caplog.text
        r = httpx.put(s.url + "/v1/templates/default", json={"text": "x"}, headers=AUTH)  # no admin keys
        assert r.status_code == 403 and r.json()["error"]["code"] == "editing_disabled"
        with httpx.stream(
            "POST", s.url + "/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH
        ) as r:
            assert r.status_code == 200 and "data: [DONE]" in r.read().decode()
        assert httpx.post(s.url + "/v1/chat/completions", json=chat, headers=AUTH).status_code == 200
        metrics = httpx.get(s.url + "/metrics", headers=AUTH).text
    assert _counted(metrics, "unauthenticated", "401") == 1
    assert _counted(metrics, "/v1/chat/completions", "500") == 1
    assert _counted(metrics, "/v1/templates/{name}", "403") == 1
    assert _counted(metrics, "/v1/chat/completions", "200") == 2
    assert 'genrec_request_latency_seconds_count{endpoint="/v1/chat/completions"} 3.0' in metrics
    assert 'endpoint="/metrics"' not in metrics and 'endpoint="/health"' not in metrics  # only /v1 is counted


def test_the_fast_completion_routes_answer_as_the_fastapi_routes(rec, monkeypatch):
    """POST /v1/chat/completions and /v1/completions are served by `FastRoutes` (issue 26) without FastAPI's
    request machinery, and answer every body as the FastAPI routes do: the same status and error body for a
    malformed, mis-encoded, over-nested, mistyped or refused request, the same recommendations for a valid one,
    and bodies it does not take as JSON (no or another Content-Type, empty) handed on to FastAPI."""
    import fastapi.routing

    item = rec.catalog.item_ids[history_of(rec)[-1]]
    chat = {"model": "tiny-run", "messages": [{"role": "user", "content": item}]}
    json_type = {**AUTH, "Content-Type": "application/json"}
    cases = [
        (b"{not json", json_type),
        (b'{"model": "\xff\xfe"}', json_type),
        (b"[" * 100_000 + b"]" * 100_000, json_type),
        (b"[1, 2]", json_type),
        (json.dumps({"model": "tiny-run"}).encode(), json_type),
        (json.dumps({**chat, "messages": []}).encode(), json_type),
        (json.dumps({**chat, "model": "other"}).encode(), json_type),
        (json.dumps({**chat, "n": 2}).encode(), json_type),
        (
            json.dumps({**chat, "n_items": "many"}).encode(),
            {**AUTH, "Content-Type": "Application/JSON; charset=utf-8"},
        ),
        (json.dumps({**chat, "history": ["no-such-item"]}).encode(), json_type),
        (json.dumps({**chat, "template": "no-such-template"}).encode(), json_type),
        (json.dumps(chat).encode(), {**AUTH, "Content-Type": "text/plain"}),
        (json.dumps(chat).encode(), AUTH),
        (b"", json_type),
        (json.dumps({"model": "tiny-run", "prompt": item, "stream": True}).encode(), json_type),
        (json.dumps({**chat, "response_format": {"type": "json_object"}}).encode(), json_type),
        (json.dumps(chat).encode(), {**AUTH, "Content-Type": "application/vnd.genrec+json"}),
        (b"null", json_type),
        (json.dumps(chat).encode(), {**AUTH, "Content-Type": "application/a/b+json"}),
    ]
    answers = []
    for fast in (True, False):
        service = RecService(rec, model_name="tiny-run")
        with LiveServer(create_app(service, api_keys=[KEY], fast_routes=fast)) as s:
            got = []
            for body, headers in cases:
                for path in ("/v1/chat/completions", "/v1/completions"):
                    r = httpx.post(s.url + path, content=body, headers=headers, timeout=60)
                    out = r.json()
                    got.append((r.status_code, out.get("error") or out.get("recommendations")))
            if fast:  # the fast path never reaches FastAPI's dependency solving
                with monkeypatch.context() as m:
                    m.setattr(fastapi.routing, "solve_dependencies", lambda *a, **k: 1 / 0)
                    r = httpx.post(s.url + "/v1/chat/completions", json=chat, headers=AUTH, timeout=60)
                    assert r.status_code == 200 and r.json()["recommendations"]
            answers.append(got)
    assert answers[0] == answers[1]
    statuses = {status for status, _ in answers[0]}
    assert 200 in statuses and 400 in statuses and max(statuses) < 500


def test_json_content_types_are_read_as_fastapi_reads_them():
    """`is_json` takes a body for JSON exactly where FastAPI does (its email.message reading of Content-Type)."""
    import email.message

    from genrec.serve.app import is_json

    def fastapi_reads_json(value: str) -> bool:
        m = email.message.Message()
        m["content-type"] = value
        sub = m.get_content_subtype()
        return m.get_content_maintype() == "application" and (sub == "json" or sub.endswith("+json"))

    values = [
        "application/json", "Application/JSON", "application/json; charset=utf-8", "application/json ;x=1",
        " application/json", "application/vnd.api+json", "application/a/b+json", "application//+json",
        "application / json", "application", "text/json", "application/jsonx", "application/+json",
        "application/json+", "", ";", "application/json;", "APPLICATION/X+JSON; q=1", "application/json\t",
    ]  # fmt: skip
    for value in values:
        assert is_json(value) == fastapi_reads_json(value), value


def test_the_worker_does_not_rank_requests_already_answered_or_given_up(rec, monkeypatch):
    """A request whose client gave up (its task cancelled) or that already got its 503 is not ranked when its
    batch comes round: the engine's time goes to requests still waiting."""
    import asyncio

    from genrec.serve.service import Query

    service = RecService(
        rec, model_name="tiny-run", limits=ServeLimits(adaptive_wait=False, batch_wait_ms=300)
    )
    ranked: list[int] = []
    real = service._rank_batch

    def counting(requests):
        ranked.append(len(requests))
        return real(requests)

    monkeypatch.setattr(service, "_rank_batch", counting)
    history = history_of(rec)

    async def run() -> list[object]:
        await service.start()
        try:
            gone = asyncio.create_task(
                service.recommend(Query(history=list(history), options=rec.cfg.ranking))
            )
            kept = asyncio.create_task(
                service.recommend(Query(history=list(history), options=rec.cfg.ranking))
            )
            await asyncio.sleep(0.05)  # both queued; the batch is held open for 300 ms
            gone.cancel()
            return await asyncio.gather(gone, kept, return_exceptions=True)
        finally:
            await service.stop()

    gone, kept = asyncio.run(run())
    assert isinstance(gone, asyncio.CancelledError) and isinstance(kept, list) and kept
    assert ranked == [1] and service.queue_depth == 0
