"""HTTP load generator: the official openai client (asyncio), bounded concurrency, loopback only.
Reports QPS, p50/p95/p99 latency, error count and validity (every returned item a real catalogue
item, distinct, not in the request's history) per concurrency level, in three modes on one run:

  genrec  `genrec serve`: constrained beam search, top-n items per request
  greedy  `vllm serve` on the run's merged model: unconstrained greedy decoding of one ID's worth of
          tokens from the same prompt (token ids rendered with the run's template): the speed floor
  beam    `vllm serve`, vLLM's built-in beam search (`use_beam_search`, n = width) of the same length

    genrec serve --run runs/demo --port 8000 &
    python -m bench.load --run runs/demo --url http://127.0.0.1:8000 --concurrency 1,8,32,128 --requests 400
    vllm serve runs/demo/merged --port 8001 --served-model-name demo &
    python -m bench.load --run runs/demo --url http://127.0.0.1:8001 --mode greedy
    python -m bench.load --run runs/demo --url http://127.0.0.1:8001 --mode beam --n-items 10

Validity in greedy/beam modes is the share of generated sequences that parse to a catalogue item not
in the history (distinct across the beams): what constrained decoding guarantees and these do not.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One request's input: the history as item ids, and (greedy/beam) its rendered prompt token ids."""

    history: list[str]
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class Target:
    mode: str
    model: str
    n_items: int
    catalog: set[str]
    depth: int = 0
    parse: Callable[[str], str | None] = lambda text: None
    """ID string -> item id (greedy/beam): None when the text is no catalogue item."""


async def one(client: Any, tg: Target, job: Job) -> tuple[float, float, str | None]:
    """(latency, validity of this response in [0, 1], error name or None)."""
    t = time.perf_counter()
    try:
        if tg.mode == "genrec":
            resp = await client.chat.completions.create(
                model=tg.model,
                messages=[{"role": "user", "content": ", ".join(job.history)}],
                extra_body={"n_items": tg.n_items},
            )
            ids = [r["item_id"] for r in resp.model_extra["recommendations"]]
            ok = len(ids) == tg.n_items and len(set(ids)) == len(ids) and set(ids) <= tg.catalog
            return time.perf_counter() - t, float(ok and not set(ids) & set(job.history)), None
        beam = tg.mode == "beam"
        resp = await client.completions.create(
            model=tg.model,
            prompt=job.prompt_ids,
            max_tokens=tg.depth,
            temperature=0.0,
            n=tg.n_items if beam else 1,
            extra_body={
                "use_beam_search": beam,
                "ignore_eos": True,
                "min_tokens": tg.depth,
                "skip_special_tokens": False,
            },
        )
    except Exception as e:  # a benchmark counts failures instead of stopping; the kind says which
        cause = f" ({type(e.__cause__).__name__})" if e.__cause__ is not None else ""
        return time.perf_counter() - t, 0.0, type(e).__name__ + cause
    items = [tg.parse(c.text) for c in resp.choices]
    good = {i for i in items if i is not None and i not in job.history}
    return time.perf_counter() - t, len(good) / max(1, len(items)), None


async def level(url: str, tg: Target, jobs: list[Job], conc: int, n: int) -> dict[str, Any]:
    import openai

    from bench.common import percentiles

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(conc)
    rng = random.Random(conc)

    async def bounded() -> tuple[float, float, str | None]:
        async with sem:
            return await one(client, tg, rng.choice(jobs))

    t = time.perf_counter()
    res = await asyncio.gather(*[bounded() for _ in range(n)])
    wall = time.perf_counter() - t
    await client.close()
    ok = [r for r in res if r[2] is None]
    kinds = Counter(r[2] for r in res if r[2] is not None)
    return {
        "concurrency": conc,
        "requests": n,
        "qps": round(n / wall, 1),
        **percentiles([r[0] for r in ok] or [0.0]),
        "errors": n - len(ok),
        "error_kinds": dict(kinds),
        "validity": round(sum(r[1] for r in ok) / max(1, len(ok)), 4),
    }


def make_jobs(run: Any, mode: str, n_items: int) -> tuple[list[Job], Target]:
    """Histories of the run's users (last 5 items before the test item) and, for vLLM modes, prompts."""
    data = run.load_data()
    ids = data.catalog.item_ids
    seqs = [s[:-1][-5:] for s in data.sequences if len(s) >= 2]  # an empty history is a 400, by design
    tg = Target(mode=mode, model=run.path.name, n_items=n_items, catalog=set(ids))
    if mode == "genrec":
        return [Job([ids[i] for i in s]) for s in seqs], tg
    from transformers import AutoTokenizer

    from genrec.engines.base import encode_chat
    from genrec.training import prompt_builder

    item_ids = run.load_ids()
    builder = prompt_builder(run, run.load_config(), data, item_ids)
    tok = AutoTokenizer.from_pretrained(run.model_dir())
    tg.depth = item_ids.depth

    def parse(text: str) -> str | None:
        row = item_ids.parse(text.replace(" ", "").strip())
        return ids[row] if row is not None else None

    tg.parse = parse
    return [Job([ids[i] for i in s], encode_chat(tok, builder.messages(s))) for s in seqs], tg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the run's name)")
    p.add_argument("--mode", choices=["genrec", "greedy", "beam"], default="genrec")
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
    jobs, tg = make_jobs(run, args.mode, args.n_items)
    tg.model = args.model or tg.model
    levels = []
    for c in args.concurrency.split(","):
        levels.append(asyncio.run(level(args.url, tg, jobs, int(c), args.requests)))
        print(levels[-1])
    save(args.out, {"url": args.url, "mode": args.mode, "n_items": args.n_items, "levels": levels})


if __name__ == "__main__":
    main()
