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
    args = ap.parse_args()
    import uvicorn

    from genrec.run import RunDir
    from genrec.serve.http import uvicorn_options

    run = RunDir(args.run)
    app = floor_app(list(run.load_data().catalog.item_ids), model=run.path.name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options())


if __name__ == "__main__":
    main()
