"""CPU a served request costs by stage, without HTTP: the run's users as chat requests through RecService's own
steps (parse and the template pinned at admission, the engine worker's batch: render, then rank_requests; the
response encoded), each timed on its thread's CPU clock (genrec.cpu_time), so other processes on a shared machine change the figures
little. Also, side by side in the same process: the response encoded as FastAPI did it before issue 26 (a
pydantic ChatCompletionResponse walked by `jsonable_encoder`, then `json.dumps`) against genrec.serve.encode (dicts
through orjson), and the template lookups a request makes at admission (pin_template, builder_for) with the
file-system calls they make, checking the disk every time (before) and with
ServeLimits.template_recheck_s (after); and the CPU of the app's ASGI stack alone (body limit, the auth and metrics
middleware, routing, a route with no engine work, its response), called in-process with no sockets, for a chat
completion through the fast completion routes and through FastAPI's route.

    python -m bench.serve_cpu --run runs/demo --requests 512 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench.common import save


def thread_ms(fn: Any, n: int) -> float:
    """The calling thread's CPU per call of fn(), in ms, over n calls."""
    start = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - start) / n / 1e6


def stages(service: Any, texts: list[str], batch: int) -> dict[str, float]:
    """Each stage's CPU ms per request for `texts` served as chat messages, `batch` at a time."""
    from genrec.serve import encode
    from genrec.serve.protocol import ChatCompletionRequest

    rec = service.rec
    before = rec.clock.seconds()
    for lo in range(0, len(texts), batch):
        chunk = [
            ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": t}]})
            for t in texts[lo : lo + batch]
        ]
        queries = []
        for req in chunk:
            with rec.clock.stage("parse"):  # parsed, its template version pinned at admission
                q = service.parse(req, text=req.messages[-1].text(), user=None)
                service.pin(q, None)
            queries.append(q)
        reqs = [service.rank_request(q) for q in queries]
        ranked = service._rank_batch(reqs)  # the engine worker's call: renders, then ranks
        for q, recs in zip(queries, ranked, strict=True):
            assert not isinstance(recs, Exception), recs
            with rec.clock.stage("encode"):
                encode.chat_completion(
                    model="m",
                    content="",
                    recs=recs,
                    prompt_tokens=1,
                    completion_tokens=1,
                    template=service.template_info(q.template.name, q.template.hash, q.template.version),
                )
    after = rec.clock.seconds()
    return {k: round((after[k] - before[k]) * 1000 / len(texts), 4) for k in after}


def encode_before_after(recs: list[Any], n: int) -> dict[str, float]:
    """One 10-item chat reply: FastAPI's path for a returned pydantic model, and genrec.serve.encode's."""
    from fastapi.encoders import jsonable_encoder

    from genrec.serve import encode
    from genrec.serve.protocol import AssistantMessage, ChatChoice, ChatCompletionResponse, Usage
    from genrec.serve.service import recommended_items

    template = {"name": "t", "version": 1, "hash": "h", "trained_hash": "h", "matches_training": True}

    def before() -> bytes:
        resp = ChatCompletionResponse(
            model="m",
            choices=[ChatChoice(message=AssistantMessage(content="x" * 200))],
            usage=Usage(prompt_tokens=50, completion_tokens=40, total_tokens=90),
            recommendations=recommended_items(recs),
            template=template,
        )
        return json.dumps(jsonable_encoder(resp), ensure_ascii=False, separators=(",", ":")).encode()

    def after() -> bytes:
        return encode.chat_completion(
            model="m", content="x" * 200, recs=recs, prompt_tokens=50, completion_tokens=40, template=template
        )

    assert json.loads(before())["recommendations"] == json.loads(after())["recommendations"]
    b, a = thread_ms(before, n), thread_ms(after, n)
    return {"before_ms": round(b, 4), "after_ms": round(a, 4), "ratio": round(b / a, 1)}


def template_lookups(rec: Any, n: int) -> dict[str, Any]:
    """What admission's template lookups cost, and the file-system calls (stat, open) they make per request."""
    calls = {"stat": 0, "open": 0}
    real_stat, real_open = os.stat, os.open

    def lookup() -> None:
        v = rec.pin_template(rec.template_for(None))
        rec.builder_for(v.name, v.version)

    def counting_stat(*a: Any, **k: Any) -> Any:
        calls["stat"] += 1
        return real_stat(*a, **k)

    def counting_open(*a: Any, **k: Any) -> Any:
        calls["open"] += 1
        return real_open(*a, **k)

    ms = thread_ms(lookup, n)
    os.stat, os.open = counting_stat, counting_open  # type: ignore[assignment]
    try:
        lookup()
    finally:
        os.stat, os.open = real_stat, real_open  # type: ignore[assignment]
    return {"ms": round(ms, 4), "fs_calls_per_request": calls}


def lookups_before_after(rec: Any, n: int) -> dict[str, Any]:
    """Admission's template lookups with the disk checked every time (before issue 26, and recheck_s 0) and
    with the server's ServeLimits.template_recheck_s."""
    from genrec.serve.service import ServeLimits

    out = {}
    for name, seconds in (("before", 0.0), ("after", ServeLimits().template_recheck_s)):
        rec.templates.recheck_s = seconds
        out[name] = template_lookups(rec, n)
    out["ratio"] = round(out["before"]["ms"] / out["after"]["ms"], 1)
    return out


def asgi_stack(service: Any, n: int, key: str, chat_body: bytes) -> dict[str, float]:
    """CPU ms per request through the app's whole ASGI stack with no sockets and no engine work: GET /v1/models
    with a key (auth, routing, the route, metrics) and without one (the middleware's 401); and a chat completion
    (`chat_body`) whose answer is a canned reply (OpenAIServing.chat replaced: no parsing, ranking or encoding),
    through the fast completion routes (genrec.serve.app.FastRoutes) and through FastAPI's route as before."""
    import asyncio

    from genrec.serve.app import create_app
    from genrec.serve.openai_api import OpenAIServing

    async def one(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        await app(scope, receive, send)
        return int(sent[0]["status"])

    auth = [(b"authorization", f"Bearer {key}".encode())]
    as_json = [*auth, (b"content-type", b"application/json")]
    fast, slow = (create_app(service, api_keys=[key], fast_routes=f) for f in (True, False))
    cases: tuple[tuple[str, Any, str, str, list[tuple[bytes, bytes]], bytes, int], ...] = (
        ("models", fast, "GET", "/v1/models", auth, b"", 200),
        ("unauthenticated", fast, "GET", "/v1/models", [], b"", 401),
        ("chat_fast_routes", fast, "POST", "/v1/chat/completions", as_json, chat_body, 200),
        ("chat_fastapi_route", slow, "POST", "/v1/chat/completions", as_json, chat_body, 200),
    )

    async def canned(self: Any, req: Any) -> bytes:
        return b'{"object": "chat.completion"}'

    async def run() -> dict[str, float]:
        out = {}
        for name, app, method, path, headers, body, status in cases:
            assert await one(app, method, path, headers, body) == status
            start = time.thread_time_ns()
            for _ in range(n):
                await one(app, method, path, headers, body)
            out[f"{name}_ms"] = round((time.thread_time_ns() - start) / n / 1e6, 4)
        return out

    real = OpenAIServing.chat
    OpenAIServing.chat = canned  # type: ignore[method-assign]
    try:
        return asyncio.run(run())
    finally:
        OpenAIServing.chat = real  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument(
        "--batch", type=int, default=32, help="requests per engine call (the server's micro-batch)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from genrec.recommender import Recommender
    from genrec.run import RunDir
    from genrec.serve.service import RecService

    rec = Recommender.load(RunDir(args.run), device="cpu")
    service = RecService(rec, model_name="m")
    ids = rec.catalog.item_ids
    histories = [rec.user_history(u)[-5:] for u in rec.data.users]
    texts = [", ".join(ids[i] for i in h) for h in histories if h]
    texts = (texts * (1 + args.requests // max(1, len(texts))))[: args.requests]
    stages(service, texts[: args.batch], args.batch)  # warm: lazy loads, first calls
    split = stages(service, texts, args.batch)
    outside = round(sum(v for k, v in split.items() if k != "rank"), 4)
    recs = rec.rank_requests([service.rank_request(_query(service, texts[0]))])[0]
    out = {
        "run": args.run,
        "requests": len(texts),
        "batch": args.batch,
        "stage_cpu_ms_per_request": split,
        "outside_rank_cpu_ms_per_request": outside,
        "encode_10_items": encode_before_after(recs, 2000),
        "template_lookups": lookups_before_after(rec, 2000),
        "asgi_stack": asgi_stack(service, 2000, "k", _chat_body(texts[0])),
    }
    print(json.dumps(out, indent=1))
    save(args.out, out)


def _chat_body(text: str) -> bytes:
    """A chat completion request's JSON body as the openai client sends it."""
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], "n_items": 10}).encode()


def _query(service: Any, text: str) -> Any:
    from genrec.serve.protocol import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": text}]}
    )
    q = service.parse(req, text=text, user=None)
    service.render(q, None)
    return q


if __name__ == "__main__":
    main()
