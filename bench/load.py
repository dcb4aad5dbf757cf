"""HTTP load generator for `genrec serve`: the official openai client (asyncio), bounded concurrency,
loopback only. Reports QPS, p50/p95/p99 latency, error count and validity (every returned item a
real catalogue item, distinct, not in the request's history) per concurrency level.

    genrec serve --run runs/demo --port 8000 &
    python -m bench.load --run runs/demo --url http://127.0.0.1:8000 --concurrency 1,8,32,128 --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any


async def one(
    client: Any, model: str, hist: list[str], n_items: int, catalog: set[str]
) -> tuple[float, bool, str | None]:
    t = time.perf_counter()
    try:
        resp = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": ", ".join(hist)}],
            extra_body={"n_items": n_items},
        )
    except Exception as e:  # a benchmark counts failures instead of stopping
        return time.perf_counter() - t, False, type(e).__name__
    ids = [r["item_id"] for r in resp.model_extra["recommendations"]]
    valid = (
        len(ids) == n_items and len(set(ids)) == len(ids) and set(ids) <= catalog and not set(ids) & set(hist)
    )
    return time.perf_counter() - t, valid, None


async def level(
    url: str, model: str, histories: list[list[str]], conc: int, n: int, n_items: int, catalog: set[str]
) -> dict[str, Any]:
    import openai

    from bench.common import percentiles

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(conc)
    rng = random.Random(conc)

    async def bounded() -> tuple[float, bool, str | None]:
        async with sem:
            return await one(client, model, rng.choice(histories), n_items, catalog)

    t = time.perf_counter()
    res = await asyncio.gather(*[bounded() for _ in range(n)])
    wall = time.perf_counter() - t
    await client.close()
    ok = [r for r in res if r[2] is None]
    return {
        "concurrency": conc,
        "requests": n,
        "qps": round(n / wall, 1),
        **percentiles([r[0] for r in ok] or [0.0]),
        "errors": n - len(ok),
        "validity": round(sum(r[1] for r in ok) / max(1, len(ok)), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the run's name)")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--n-items", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    host = args.url.split("//")[-1].split(":")[0]
    if not (host.startswith("127.") or host in ("localhost", "[::1]")):
        raise SystemExit("load tests only target loopback addresses")

    from bench.common import save
    from genrec.run import RunDir

    run = RunDir(args.run)
    data = run.load_data()
    ids = data.catalog.item_ids
    histories = [[ids[i] for i in s[:-1][-5:]] for s in data.sequences]
    model = args.model or run.path.name
    levels = [
        asyncio.run(level(args.url, model, histories, int(c), args.requests, args.n_items, set(ids)))
        for c in args.concurrency.split(",")
    ]
    for lv in levels:
        print(lv)
    save(args.out, {"url": args.url, "levels": levels})


if __name__ == "__main__":
    main()
