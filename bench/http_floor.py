"""The HTTP floor: what one request costs a process that does nothing but HTTP, on the stack `genrec serve` runs.

Issue 26 counts the server's CPU per request outside the model's forward pass. Part of that is not genrec's work at
all: uvicorn's protocol (httptools), asyncio's socket reads and writes, the body-limit middleware, parsing the JSON
body and encoding the reply. This serves a stand-in for the chat endpoint on exactly that stack (genrec's
`uvicorn_options`: the header-deadline protocol, keep-alive; `BodyLimit`; orjson both ways) that answers every POST
with n catalogue items not in the request's history, chosen by a fixed rotation (no model, no template, no
retrieval), so that `bench.load` can load it with the same clients, levels and /proc CPU reading as the real server:

    python -m bench.http_floor --run runs/demo --port 8124 &
    python -m bench.load --run runs/demo --url http://127.0.0.1:8124 --concurrency 8,32,128 --requests 1500 \\
        --processes 2 --max-seconds 25 --server-pid <pid> --out bench/results/cpu_load_http_floor.json

The server's CPU per request here is the floor under any Python server on this stack and machine; the real server's
figure minus this one is genrec's own work.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import MutableMapping
from typing import Any

from fastapi.responses import Response

# at module level: FastAPI resolves the route's (string) annotations in this module's globals
from genrec.serve.protocol import ChatCompletionRequest


def floor_app(item_ids: list[str], *, model: str) -> Any:
    """A pure ASGI app: POST (any path) -> a chat-completion-shaped reply with `n_items` items; GET -> 200."""
    import orjson

    from genrec.serve.http import BodyLimit, HTTPLimits

    rotation = itertools.count()
    json_headers = [(b"content-type", b"application/json")]

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = (await receive()).get("body", b"")
        if scope["method"] != "POST":
            await reply(send, 200, b'{"status":"ok"}')
            return
        request = orjson.loads(body)
        n = int(request.get("n_items", 10))
        history = set(str(request["messages"][-1]["content"]).split(", "))
        start = next(rotation) % len(item_ids)
        items: list[str] = []
        for k in range(len(item_ids)):
            item = item_ids[(start + k) % len(item_ids)]
            if item not in history:
                items.append(item)
                if len(items) == n:
                    break
        recs = [{"item_id": i, "rank": r + 1, "score": 0.0} for r, i in enumerate(items)]
        payload = {
            "id": "floor",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ", ".join(items)},
                    "finish_reason": "stop",
                }
            ],
            "recommendations": recs,
        }
        await reply(send, 200, orjson.dumps(payload))

    async def reply(send: Any, status: int, data: bytes) -> None:
        headers = [*json_headers, (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return BodyLimit(app, limits=HTTPLimits())


def fastapi_floor_app(item_ids: list[str], *, model: str) -> Any:
    """The same answers through the layers genrec's app adds before and after a route: FastAPI's routing and its
    validation of the body into genrec's ChatCompletionRequest (pydantic), the Observe middleware (per-request
    Prometheus counters) and BodyLimit outermost, as genrec.serve.app.create_app stacks them."""
    import orjson
    from fastapi import FastAPI

    from genrec.serve.app import Observe, protected_paths
    from genrec.serve.http import BodyLimit, HTTPLimits
    from genrec.serve.service import Metrics

    rotation = itertools.count()
    app = FastAPI(title="floor")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest) -> Response:
        history = set(req.messages[-1].text().split(", "))
        start = next(rotation) % len(item_ids)
        items = [i for i in item_ids[start:] + item_ids[:start] if i not in history][: req.n_items or 10]
        recs = [{"item_id": i, "rank": r + 1, "score": 0.0} for r, i in enumerate(items)]
        payload = {
            "id": "floor",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ", ".join(items)}}],
            "recommendations": recs,
        }
        return Response(orjson.dumps(payload), media_type="application/json")

    exact, prefixes = protected_paths(())
    app.add_middleware(Observe, metrics=Metrics(), keys=set(), exact=exact, prefixes=prefixes)
    app.add_middleware(BodyLimit, limits=HTTPLimits())
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="A run whose catalogue the replies draw items from.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument(
        "--log-level",
        default="info",
        help="uvicorn's; info (what `genrec serve` runs with) writes an access-log line per request, warning none",
    )
    ap.add_argument(
        "--fastapi",
        action="store_true",
        help="route through FastAPI with genrec's request model and middleware (fastapi_floor_app)",
    )
    args = ap.parse_args()
    import uvicorn

    from genrec.run import RunDir
    from genrec.serve.http import uvicorn_options

    run = RunDir(args.run)
    make = fastapi_floor_app if args.fastapi else floor_app
    app = make(list(run.load_data().catalog.item_ids), model=run.path.name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options())


if __name__ == "__main__":
    main()
