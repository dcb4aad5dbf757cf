"""`genrec serve --frontends N`: front-end processes feeding one engine core (genrec.serve.frontends,
genrec.serve.engine_core) serve what the single-process server serves, to the same clients."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from multiprocessing import Pipe

import httpx
import openai
import pytest

from genrec.prep import prepare_with_layouts
from genrec.recommender import PreparedBatch, Recommender, history_requests
from genrec.serve.app import create_app
from genrec.serve.engine_core import CoreClient, EngineCore, RemoteService, merge_prepared, split_prepared
from genrec.serve.frontends import FrontendServer, FrontendSpec
from genrec.serve.service import RecService, ServeLimits
from tests.conftest import copy_run
from tests.test_server import LiveServer, assert_queue_full_gives_429, free_port

KEY, ADMIN = "test-key", "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fe_run(trained_run, tmp_path_factory):
    return copy_run(trained_run[0], tmp_path_factory, "frontends")


@pytest.fixture(scope="module")
def rec(fe_run):
    return Recommender.load(fe_run, device="cpu")


def spec_for(rec: Recommender, **limits: float) -> FrontendSpec:
    return FrontendSpec(
        run=str(rec.run.path),
        model_name="tiny-run",
        limits=ServeLimits(**limits),  # type: ignore[arg-type]
        api_keys=[KEY],
        admin_keys={ADMIN: "alice"},
        layout_policy=rec.engine.layout_policy,
        log_level="warning",
    )


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"{url} did not come up"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def single(rec):
    service = RecService(rec, model_name="tiny-run")
    with LiveServer(create_app(service, api_keys=[KEY], admin_keys={ADMIN: "alice"})) as s:
        yield s.url


@pytest.fixture(scope="module")
def multi(rec):
    server = FrontendServer(rec, spec_for(rec), frontends=2, host="127.0.0.1", port=0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        wait_healthy(url)
        yield url
    finally:
        server.close()


def chat(url: str, **body):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="tiny-run", messages=[{"role": "user", "content": body.pop("content", "")}], extra_body=body
    )


def test_two_frontends_rank_as_one_process(single, multi, rec):
    for k, user in enumerate(rec.data.users[:6]):
        hist = [rec.catalog.item_ids[i] for i in rec.user_history(user)[-4:]]
        body = {"history": hist, "n_items": 6, "candidates": "all" if k % 2 else "retriever"}
        one, two = (chat(url, **body).parse() for url in (single, multi))
        assert one.choices[0].message.content == two.choices[0].message.content
        assert one.model_extra["recommendations"] == two.model_extra["recommendations"]  # items and scores
        assert one.usage == two.usage and one.model_extra["template"] == two.model_extra["template"]
    by_user = [chat(url, user=rec.data.users[7], content="").parse() for url in (single, multi)]
    assert by_user[0].model_extra["recommendations"] == by_user[1].model_extra["recommendations"]


def frontend_of(url: str, rec: Recommender, k: int) -> tuple[str, dict]:
    """Which front-end answered a request on a new connection, and the reply."""
    hist = [rec.catalog.item_ids[i] for i in rec.user_history(rec.data.users[k % 20])[-3:]]
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "tiny-run", "messages": [{"role": "user", "content": ""}], "history": hist},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-genrec-frontend"], r.json()


def test_requests_are_spread_over_both_frontends_and_batched_by_one_core(multi, rec):
    seen: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            seen |= {fe for fe, _ in pool.map(lambda k: frontend_of(multi, rec, k), range(16))}
            if len(seen) == 2:
                break
    assert len(seen) == 2 and {s.split("/")[0] for s in seen} == {"0", "1"}
    text = httpx.get(multi + "/metrics", headers=AUTH).text
    assert "genrec_frontends 2.0" in text and "genrec_frontend_info{" in text
    batches = float(
        next(ln for ln in text.splitlines() if ln.startswith("genrec_batch_size_count")).split()[-1]
    )
    ranked = sum(
        float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("genrec_ranked_requests_total{")
    )
    assert ranked >= 16 and batches <= ranked  # the core's counters, across both front-ends
    busy = float(
        next(ln for ln in text.splitlines() if ln.startswith("genrec_engine_busy_seconds_total")).split()[-1]
    )
    stages = [ln for ln in text.splitlines() if ln.startswith("genrec_stage_cpu_seconds_total{")]
    assert busy > 0 and any('stage="render"' in ln and float(ln.split()[-1]) > 0 for ln in stages)
    assert "genrec_server_cpu_seconds_total" in text


def test_a_template_activated_through_one_frontend_is_used_by_both(multi, rec):
    admin = httpx.Client(base_url=multi, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    got = admin.get("/v1/templates/default")
    assert got.status_code == 200, got.text
    saved = admin.put(
        "/v1/templates/default",
        json={"text": got.json()["text"] + "{# edited #}\n", "message": "a no-op edit"},
        headers={"If-Match": got.headers["etag"]},
    )
    assert saved.status_code == 200, saved.text
    version = saved.json()["version"]
    time.sleep(0.6)  # ServeLimits.template_recheck_s: the other front-end looks at the disk again by then
    used: dict[str, set[int]] = {}
    for k in range(200):
        fe, body = frontend_of(multi, rec, k)
        used.setdefault(fe, set()).add(body["template"]["version"])
        if len(used) == 2 and k >= 8:
            break
    assert len(used) == 2 and all(v == {version} for v in used.values()), used
    assert admin.post("/v1/templates/default/rollback").status_code == 200


def test_invalid_input_gets_the_same_4xx(single, multi, rec):
    item = rec.catalog.item_ids[0]
    cases = [
        ({"model": "nope", "messages": [{"role": "user", "content": item}]}, AUTH),
        ({"model": "tiny-run", "messages": [{"role": "user", "content": "I99999"}]}, AUTH),
        ({"model": "tiny-run", "messages": [{"role": "user", "content": ""}], "history": []}, AUTH),
        ({"model": "tiny-run", "messages": [{"role": "user", "content": item}], "n": 2}, AUTH),
        ({"model": "tiny-run", "messages": [{"role": "user", "content": item}], "template": "missing"}, AUTH),
        ({"model": "tiny-run", "messages": "not a list"}, AUTH),
        ({"model": "tiny-run", "messages": [{"role": "user", "content": item}]}, {}),
    ]

    def answer(url: str, body: dict, headers: dict) -> tuple[int, object]:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        err = r.json()["error"]
        return r.status_code, (err.get("code"), err.get("param"), err.get("type"))

    for body, headers in cases:
        one, two = answer(single, body, headers), answer(multi, body, headers)
        assert one == two and 400 <= one[0] < 500, (body, one, two)
    bad = httpx.post(
        multi + "/v1/chat/completions",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(multi + "/v1/chat/completions", content=b"x" * (2 << 20), headers=AUTH)
    assert huge.status_code == 413


def test_a_template_that_fails_to_render_fails_its_own_request_in_both_servers(single, multi, rec):
    """Prompts are rendered where the batch is prepared (the engine's batch in one process, a front-end's group
    with --frontends): a request whose template fails there gets its 400 with the line, in both servers alike,
    and requests beside it are answered."""
    longest = max(len(s) for s in rec.data.sequences)
    text = (
        f"---\nname: failing\n---\n{{% if n_history_total > {longest} %}}{{{{ nosuch.field }}}}{{% endif %}}x"
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    saved = httpx.put(multi + "/v1/templates/failing", json={"text": text}, headers=admin, timeout=60)
    assert saved.status_code == 201, saved.text
    ids = rec.catalog.item_ids
    too_long = [ids[k % len(ids)] for k in range(longest + 1)]

    def ask(url: str, history: list[str]) -> httpx.Response:
        body = {"model": "tiny-run", "messages": [{"role": "user", "content": ""}], "history": history}
        return httpx.post(
            url + "/v1/chat/completions", json={**body, "template": "failing"}, headers=AUTH, timeout=60
        )

    for url in (single, multi):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            histories = [list(ids[:3]), too_long, list(ids[3:6]), too_long]
            replies = list(pool.map(ask, [url] * 4, histories))
        assert [r.status_code for r in replies] == [200, 400, 200, 400], [r.text for r in replies]
        err = replies[1].json()["error"]
        assert (err["code"], err["param"], err["line"]) == ("template_error", "template", 4), err


def test_a_full_engine_core_queue_gives_429_with_retry_after(rec):
    """The core's depth decides, whichever front-end asks (here one in this process, over a pipe)."""
    ours, theirs = Pipe()
    core = EngineCore(rec, ServeLimits(max_queue=0))
    core.attach(ours)
    core.start()
    service = RemoteService(rec, CoreClient(theirs), model_name="m", layout_policy=rec.engine.layout_policy)
    try:
        assert_queue_full_gives_429(create_app(service), rec)
    finally:
        core.stop()


def test_a_scrape_waiting_for_the_core_does_not_hold_up_other_requests(rec):
    """/metrics asks the engine core for its counters over the pipe; while the core does not answer (here:
    nobody reads the pipe, so the scrape waits its 2 s), /health is answered before the scrape returns."""
    _, theirs = Pipe()
    service = RemoteService(rec, CoreClient(theirs), model_name="m", layout_policy=rec.engine.layout_policy)
    with LiveServer(create_app(service)) as s:
        order: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            scrape = pool.submit(
                lambda: order.append(f"metrics {httpx.get(s.url + '/metrics', timeout=30).status_code}")
            )
            time.sleep(0.5)  # the scrape is waiting for the core
            order.append(f"health {httpx.get(s.url + '/health', timeout=30).status_code}")
            scrape.result()
    assert order == ["health 200", "metrics 200"]


def test_the_core_ranks_requests_of_several_frontends_in_one_batch(rec):
    """Two front-ends' requests inside one batch window are one engine batch, ranked as in one process."""
    core = EngineCore(rec, ServeLimits(batch_wait_ms=500, adaptive_wait=False))
    pipes = [Pipe() for _ in range(2)]
    for ours, _ in pipes:
        core.attach(ours)
    core.start()

    def requests():
        return history_requests(
            [rec.user_history(u)[-3:] for u in rec.data.users[:2]], rec.cfg.ranking.with_(n_items=5)
        )

    try:
        for k, ((_, theirs), req) in enumerate(zip(pipes, requests(), strict=True)):
            prepared = prepare_with_layouts(rec, [req], rec.engine.layout_policy)
            theirs.send(("rank", 0, [(k, req, prepared)], {}, 0.0))
        replies = [theirs.recv() for _, theirs in pipes]
    finally:
        core.stop()
    assert core.batch_count == 1 and core.batch_sum == 2
    assert [(kind, rid) for kind, rid, _ in replies] == [("done", 0), ("done", 1)]
    for (_, _, got), want in zip(replies, rec.rank_requests(requests()), strict=True):
        assert [r.item for r in got] == [r.item for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-5)


def test_the_core_launches_the_next_batch_before_reading_one_back(rec, monkeypatch):
    """Requests that queue while a batch ranks are launched as the next batch before the first is read back
    (the device is never idle while the core replies), answered in order as in one process; a batch that
    fails to launch answers its requests "failed" and the core goes on."""
    events: list[tuple[str, int]] = []
    real = rec.launch_prepared

    def launch(requests, prepared):
        n = len(events)
        events.append(("launch", len(requests)))
        if n == 0:
            time.sleep(0.5)  # the first batch is slow to launch: the next requests queue meanwhile
        if len(requests) == 1 and n > 0:
            raise RuntimeError("bad batch")
        finish = real(requests, prepared)

        def done():
            events.append(("finish", len(requests)))
            return finish()

        return done

    monkeypatch.setattr(rec, "launch_prepared", launch)
    core = EngineCore(rec, ServeLimits(batch_wait_ms=0, adaptive_wait=False))
    ours, theirs = Pipe()
    core.attach(ours)
    core.start()
    reqs = history_requests(
        [rec.user_history(u)[-3:] for u in rec.data.users[:4]], rec.cfg.ranking.with_(n_items=5)
    )

    def send(rid):
        prepared = prepare_with_layouts(rec, [reqs[rid]], rec.engine.layout_policy)
        theirs.send(("rank", 0, [(rid, reqs[rid], prepared)], {}, 0.0))

    try:
        send(0)
        time.sleep(0.2)  # batch 0 is launching
        send(1)
        send(2)
        replies = [theirs.recv() for _ in range(3)]
        send(3)  # alone: its launch fails
        failed = theirs.recv()
    finally:
        core.stop()
    assert events[:4] == [("launch", 1), ("launch", 2), ("finish", 1), ("finish", 2)]
    assert [(kind, rid) for kind, rid, _ in replies] == [("done", 0), ("done", 1), ("done", 2)]
    for (_, _, got), want in zip(replies, real_ranking(rec, reqs[:3]), strict=True):
        assert [r.item for r in got] == want
    assert failed[:2] == ("failed", 3) and "bad batch" in failed[2]


def real_ranking(rec, reqs):
    return [[r.item for r in recs] for recs in rec.rank_requests(reqs)]


def test_merged_prepared_batches_keep_each_requests_parts():
    a = PreparedBatch([[1, 2]], [[5, 6]], layouts=None, retrieved_scores=[[0.5, 0.1]])
    b = PreparedBatch([[3]], [None], layouts=["lay"], retrieved_scores=None)  # type: ignore[list-item]
    m = merge_prepared([a, b])
    assert m.prompts == [[1, 2], [3]] and m.retrieved == [[5, 6], None]
    assert m.layouts == [None, "lay"] and m.retrieved_scores == [[0.5, 0.1], None]
    assert merge_prepared([a]).layouts is None
    assert merge_prepared(split_prepared(m)) == m and [len(p.prompts) for p in split_prepared(m)] == [1, 1]
    c = PreparedBatch([[4]], [None], text_vectors=["need"])  # type: ignore[list-item]
    assert merge_prepared([a, c]).text_vectors == [None, "need"]  # a request's free text travels with it
    assert [p.text_vectors for p in split_prepared(merge_prepared([a, c]))] == [[None], ["need"]]


def test_sigterm_drains_in_flight_requests(fe_run, rec):
    """`genrec serve --frontends 2`, SIGTERM while 8 requests wait in the core's 1.5 s batch window: every one
    is answered, then the server exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = fe_run.path.parent / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "genrec", "serve", "--run", str(fe_run.path), "--port", str(port),
             "--frontends", "2", "--warmup", "0", "--batch-wait-ms", "1500", "--fixed-wait", "--model-name", "m"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ROOT},
        )  # fmt: skip
    try:
        wait_healthy(url)
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": rec.catalog.item_ids[0]}],
            "n_items": 5,
        }
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60) for _ in range(8)
            ]
            assert wait_for_depth(url, 8), "the requests never reached the engine core"
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        assert codes == [200] * 8
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        print(log_path.read_text()[-3000:])


def wait_for_depth(url: str, depth: int, timeout: float = 30.0) -> bool:
    """Until the engine core's queue holds `depth` requests (its /metrics gauge)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        line = next(ln for ln in text.splitlines() if ln.startswith("genrec_queue_depth"))
        if float(line.split()[-1]) >= depth:
            return True
        time.sleep(0.02)
    return False


def test_a_frontend_that_dies_is_started_again_and_the_others_keep_serving(rec):
    """SIGKILL one of two front-ends: the other answers meanwhile, the dead one comes back with a new pid on
    the same index, requests reach it, and /metrics counts the restart with monotonic CPU counters."""
    server = FrontendServer(rec, spec_for(rec), frontends=2, host="127.0.0.1", port=0)
    server.start()
    waiter = concurrent.futures.ThreadPoolExecutor(1).submit(server.wait)
    url = f"http://127.0.0.1:{server.port}"
    try:
        wait_healthy(url)
        first = [p.pid for p in server.procs]
        for _ in range(8):  # both front-ends have reported CPU to the core
            assert chat(url, content=rec.catalog.item_ids[0], n_items=3).http_response.status_code == 200
        cpu_before = metric(url, "genrec_server_cpu_seconds_total")
        os.kill(first[0], signal.SIGKILL)
        deadline = time.time() + 120
        while server.procs[0].pid == first[0] or not server.core.snapshot()["frontends"].get(0):
            assert not waiter.done(), "the server stopped instead of restarting the front-end"
            assert time.time() < deadline, "the dead front-end was not started again"
            chat(url, content=rec.catalog.item_ids[0], n_items=3)  # the survivor answers meanwhile
            time.sleep(0.2)
        assert server.procs[0].pid != first[0] and server.procs[1].pid == first[1]
        answered = set()
        for _ in range(40):
            raw = chat(url, content=rec.catalog.item_ids[1], n_items=3)
            assert raw.http_response.status_code == 200 and len(raw.parse().choices) == 1
            answered.add(raw.http_response.headers["x-genrec-frontend"])
            if len(answered) == 2:
                break
        assert answered == {f"0/{server.procs[0].pid}", f"1/{first[1]}"}
        assert metric(url, "genrec_frontend_restarts_total") == 1.0
        assert metric(url, "genrec_server_cpu_seconds_total") >= cpu_before
        assert not waiter.done()
    finally:
        server.close()
    assert waiter.result(timeout=60) == 0


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[-1])


def test_front_ends_that_keep_dying_stop_the_server(rec):
    """A crash loop (more deaths than max_restarts within the window) stops the server with status 1;
    max_restarts=0 stops it at the first death."""
    server = FrontendServer(rec, spec_for(rec), frontends=1, host="127.0.0.1", port=0, max_restarts=1)
    server.start()
    try:
        wait_healthy(f"http://127.0.0.1:{server.port}")
        os.kill(server.procs[0].pid, signal.SIGKILL)
        assert server.wait(timeout=2) is None  # restarted: still serving
        wait_healthy(f"http://127.0.0.1:{server.port}")
        os.kill(server.procs[0].pid, signal.SIGKILL)
        assert server.wait(timeout=20) == 1
    finally:
        server.close()
    assert server.core.restarts == 1


def test_the_core_drops_replies_to_a_replaced_frontend(rec):
    """A request queued by a front-end that is then replaced is ranked, but its reply never reaches the new
    front-end on that index (whose request ids start over)."""
    core = EngineCore(rec, ServeLimits(batch_wait_ms=300, adaptive_wait=False))
    old_ours, old_theirs = Pipe()
    core.attach(old_ours)
    core.start()
    req = history_requests([rec.user_history(rec.data.users[0])[-3:]], rec.cfg.ranking.with_(n_items=3))
    try:
        old_theirs.send(
            ("rank", 0, [(0, req[0], prepare_with_layouts(rec, req, rec.engine.layout_policy))], {}, 1.5)
        )
        deadline = time.time() + 30
        while core.depth == 0:  # admitted: in the core's 300 ms batch window
            assert time.time() < deadline
            time.sleep(0.01)
        new_ours, new_theirs = Pipe()
        core.replace(0, new_ours)
        new_theirs.send(("stats", 0))
        kind, rid, snap = new_theirs.recv()
        assert (kind, rid) == ("stats", 0) and snap["restarts"] == 1 and snap["cpu_s"] >= 1.5
        deadline = time.time() + 30
        while core.batch_count == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert core.batch_count == 1
        assert not new_theirs.poll(0.5), "the dead front-end's reply went to its replacement"
    finally:
        core.stop()


def test_frontends_need_the_transformers_backend(fe_run):
    """The engine core ranks prepared requests with the transformers engine; vLLM serves from one process."""
    from genrec.errors import GenrecError
    from genrec.serve.main import ServeArgs, serve

    with pytest.raises(GenrecError, match="--backend hf"):
        serve(ServeArgs(run=fe_run.path, backend="vllm", frontends=2))


class _Proc:
    """A front-end process stand-in: alive for its first `alive_checks` is_alive() calls, then dead."""

    def __init__(self, alive_checks: int) -> None:
        self.alive_checks, self.name, self.pid, self.exitcode, self.sentinel = alive_checks, "fe", 1, -9, None

    def is_alive(self) -> bool:
        self.alive_checks -= 1
        return self.alive_checks >= 0


def test_a_front_end_dying_between_the_checks_is_still_counted():
    """The death is seen by the final liveness check and not by the loop before it: wait() must not take that for
    a clean exit (it returned 0 under load); past the limit it stops the server with 1."""
    server = object.__new__(FrontendServer)
    server.procs = [_Proc(alive_checks=1)]
    server.stopping = server.failed = False
    server.max_restarts, server.restart_window_s, server._deaths = 0, 60.0, []
    server.shutdown = lambda: setattr(server, "stopping", True)
    assert server.wait(timeout=5) == 1
