"""HTTP load generator that is not the bottleneck: several client processes, each with its own asyncio loop
and httpx connection pool, bounded concurrency and a time limit per level, loopback only. Reports QPS,
p50/p95/p99 latency, errors by kind and validity (every returned item a real catalogue item, distinct, not in
the request's history) per concurrency level, and, read from the server's /metrics before and after each
level: the engine's busy fraction (genrec_engine_busy_seconds over the level's wall time), the server
process's CPU per request (process_cpu_seconds_total) and its split by stage (genrec_stage_cpu_seconds).
Three modes on one run:

  genrec  `genrec serve`: constrained ranking, top-n items per request (POST /v1/chat/completions)
  greedy  `vllm serve` on the run's merged model: unconstrained greedy decoding of one ID's worth of
          tokens from the same prompt (token ids rendered with the run's template): the speed floor
  beam    `vllm serve`, vLLM's built-in beam search (`use_beam_search`, n = width) of the same length

    genrec serve --run runs/demo --port 8000 --max-queue 4096 &
    python -m bench.load --run runs/demo --url http://127.0.0.1:8000 --concurrency 1,8,32,128,512 \\
        --requests 2000 --processes 4 --max-seconds 60
    vllm serve runs/demo/merged --port 8001 --served-model-name demo &
    python -m bench.load --run runs/demo --url http://127.0.0.1:8001 --mode greedy

With `--serve-frontends 1,2` the benchmark starts `genrec serve --frontends N` itself on the --url's port, for each
N in turn (`--serve-args` adds flags), loads it at every level, stops it with SIGTERM, and reports the servers
side by side; the server's CPU is then read from /proc for its process and every child (the front-ends).

    python -m bench.load --run runs/demo --serve-frontends 1,2 --serve-args "--max-batch 64" \
        --concurrency 8,32,64 --requests 1000 --processes 2

A level's clients are split over the processes (each runs concurrency / processes of them, at least one)
and start together; a process stops sending once its share of requests is sent or the level's time limit
has passed, so a level ends within about max-seconds plus the slowest response. Validity in greedy/beam
modes is the share of generated sequences that parse to a catalogue item not in the history (distinct
across the beams): what constrained decoding guarantees and these do not.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    item_ids: Any = None
    """The run's genrec.ids.ItemIds (greedy/beam): which generated texts are catalogue items."""
    ids: list[str] = field(default_factory=list)
    """Catalogue rows' item ids."""

    def parse(self, text: str) -> str | None:
        """ID string -> item id; None when the text is no catalogue item."""
        row = self.item_ids.parse(text.replace(" ", "").strip())
        return self.ids[row] if row is not None else None


@dataclass
class Share:
    """What one client process runs in a level."""

    url: str
    target: Target
    jobs: list[Job]
    clients: int
    requests: int
    deadline_s: float
    seed: int


def body(tg: Target, job: Job) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one request."""
    if tg.mode == "genrec":
        return "/v1/chat/completions", {
            "model": tg.model,
            "messages": [{"role": "user", "content": ", ".join(job.history)}],
            "n_items": tg.n_items,
        }
    beam = tg.mode == "beam"
    return "/v1/completions", {
        "model": tg.model,
        "prompt": job.prompt_ids,
        "max_tokens": tg.depth,
        "temperature": 0.0,
        "n": tg.n_items if beam else 1,
        "use_beam_search": beam,
        "ignore_eos": True,
        "min_tokens": tg.depth,
        "skip_special_tokens": False,
    }


def validity(tg: Target, job: Job, reply: dict[str, Any]) -> float:
    """This reply's validity in [0, 1] (see the module docstring)."""
    if tg.mode == "genrec":
        ids = [r["item_id"] for r in reply["recommendations"]]
        ok = len(ids) == tg.n_items and len(set(ids)) == len(ids) and set(ids) <= tg.catalog
        return float(ok and not set(ids) & set(job.history))
    items = [tg.parse(c["text"]) for c in reply["choices"]]
    good = {i for i in items if i is not None and i not in job.history}
    return len(good) / max(1, len(items))


async def one(client: Any, tg: Target, job: Job) -> tuple[float, float, str | None]:
    """(latency, validity, error kind or None): an HTTP status, or the exception's name."""
    import orjson

    path, payload = body(tg, job)
    t = time.perf_counter()
    try:
        resp = await client.post(
            path, content=orjson.dumps(payload), headers={"content-type": "application/json"}
        )
        if resp.status_code != 200:
            return time.perf_counter() - t, 0.0, f"HTTP {resp.status_code}"
        reply = orjson.loads(resp.content)
    except Exception as e:  # a benchmark counts failures instead of stopping; the kind says which
        return time.perf_counter() - t, 0.0, type(e).__name__
    return time.perf_counter() - t, validity(tg, job, reply), None


async def run_share(
    share: Share, start_at: float
) -> tuple[float, float, list[tuple[float, float, str | None]]]:
    """One process's clients: (first send, last reply, results), times on the shared monotonic clock."""
    import httpx

    limits = httpx.Limits(max_connections=share.clients, max_keepalive_connections=share.clients)
    rng = random.Random(share.seed)
    results: list[tuple[float, float, str | None]] = []
    sent = 0
    async with httpx.AsyncClient(base_url=share.url, limits=limits, timeout=120) as client:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        began = time.monotonic()
        stop = began + share.deadline_s

        async def worker() -> None:
            nonlocal sent
            while sent < share.requests and time.monotonic() < stop:
                sent += 1
                results.append(await one(client, share.target, rng.choice(share.jobs)))

        await asyncio.gather(*[worker() for _ in range(share.clients)])
    return began, time.monotonic(), results


def _process(share: Share, start_at: float) -> tuple[float, float, list[tuple[float, float, str | None]]]:
    return asyncio.run(run_share(share, start_at))


def shares(
    url: str, tg: Target, jobs: list[Job], *, clients: int, requests: int, processes: int, max_s: float
) -> list[Share]:
    """A level's clients and requests split over at most `processes` processes (every process gets one client
    at least, so fewer processes than clients are used at low concurrency)."""
    n = max(1, min(processes, clients))
    split_c, split_r = np.array_split(np.arange(clients), n), np.array_split(np.arange(requests), n)
    return [
        Share(url, tg, jobs, len(c), len(r), max_s, seed=clients * 1000 + k)
        for k, (c, r) in enumerate(zip(split_c, split_r, strict=True))
    ]


METRIC = re.compile(
    r'^(genrec_engine_busy_seconds_total|process_cpu_seconds_total|genrec_stage_cpu_seconds_total)(?:\{stage="(\w+)"\})? (\S+)$'
)


def process_cpu(pid: int | None) -> dict[str, float]:
    """A local process's CPU seconds so far (user + system, from /proc) with its live descendants' (the
    front-end processes of `genrec serve --frontends N`), for a server without the counter or with several
    processes."""
    if pid is None:
        return {}
    import os
    from pathlib import Path

    def tree(p: int) -> list[int]:
        try:
            kids = [
                int(c)
                for t in Path(f"/proc/{p}/task").iterdir()
                for c in (t / "children").read_text().split()
            ]
        except OSError:
            return [p]
        return [p, *(q for k in kids for q in tree(k))]

    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return {"process_cpu_seconds_total": total / os.sysconf("SC_CLK_TCK")}


def scrape(url: str) -> dict[str, float]:
    """The server's counters this benchmark reads: engine busy seconds, process CPU seconds, CPU by stage
    (`stage:<name>`); an empty dict where the server has no /metrics (vLLM's has other names)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            out[f"stage:{m[2]}" if m[2] else m[1]] = float(m[3])
    return out


def server_side(
    before: dict[str, float], after: dict[str, float], *, wall: float, served: int
) -> dict[str, Any]:
    """Engine busy fraction over the level, server CPU per request (ms) and its split by stage."""
    if not after:
        return {}
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    per = 1000 / max(1, served)
    stages = {k.split(":", 1)[1]: round(v * per, 3) for k, v in d.items() if k.startswith("stage:")}
    cpu = d.get("process_cpu_seconds_total", 0.0) * per
    return {
        "engine_busy": round(d.get("genrec_engine_busy_seconds_total", 0.0) / wall, 3),
        "server_cpu_ms_per_request": round(cpu, 3),
        "stage_cpu_ms_per_request": stages,
        "outside_forward_cpu_ms_per_request": round(cpu - stages.get("rank", 0.0), 3) if stages else None,
        # what no stage counts: the HTTP stack (uvicorn, middleware, request validation), the event loop
        "unstaged_cpu_ms_per_request": round(cpu - sum(stages.values()), 3) if stages else None,
    }


def level(
    url: str,
    tg: Target,
    jobs: list[Job],
    *,
    clients: int,
    requests: int,
    processes: int,
    max_s: float,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """One concurrency level in `processes` client processes started together; the server's counters read
    around it."""
    from bench.common import percentiles

    parts = shares(url, tg, jobs, clients=clients, requests=requests, processes=processes, max_s=max_s)
    before = {**scrape(url), **process_cpu(server_pid)}
    ctx = mp.get_context("spawn")  # a clean interpreter per client process: no inherited loop or pool
    with ctx.Pool(len(parts)) as pool:
        start_at = time.monotonic() + 1.0 + 0.2 * len(parts)  # after every process has started its client
        done = pool.starmap(_process, [(p, start_at) for p in parts])
    after = {**scrape(url), **process_cpu(server_pid)}
    wall = max(d[1] for d in done) - min(d[0] for d in done)
    res = [r for d in done for r in d[2]]
    ok = [r for r in res if r[2] is None]
    return {
        "concurrency": clients,
        "processes": len(parts),
        "requests": len(res),
        "seconds": round(wall, 2),
        "qps": round(len(res) / wall, 1),
        **percentiles([r[0] for r in ok] or [0.0]),
        "errors": len(res) - len(ok),
        "error_kinds": dict(Counter(r[2] for r in res if r[2] is not None)),
        "validity": round(sum(r[1] for r in ok) / max(1, len(ok)), 4),
        **server_side(before, after, wall=wall, served=len(ok)),
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
    tg.item_ids, tg.ids = item_ids, list(ids)
    return [Job([ids[i] for i in s], encode_chat(tok, builder.messages(s))) for s in seqs], tg


def start_server(run: str, url: str, frontends: int, extra: list[str]) -> Any:
    """`genrec serve --frontends N` on the url's port (queue large enough for every level, no warm-up), up."""
    import subprocess
    import sys

    import httpx

    port = url.rsplit(":", 1)[1].split("/")[0]
    cmd = [sys.executable, "-m", "genrec", "serve", "--run", run, "--port", port, "--frontends", str(frontends),
           "--max-queue", "4096", "--warmup", "0", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{' '.join(cmd)} did not come up (status {proc.poll()})")
        time.sleep(0.5)


def stop_server(proc: Any) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def check_loopback(url: str) -> None:
    host = url.split("//")[-1].split("/")[0].rsplit(":", 1)[0]
    if not (host.startswith("127.") or host in ("localhost", "[::1]")):
        raise SystemExit(f"load tests only target loopback addresses, not {host!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the run's name)")
    p.add_argument("--mode", choices=["genrec", "greedy", "beam"], default="genrec")
    p.add_argument("--concurrency", default="1,8,32,128,512")
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level (at most)")
    p.add_argument("--processes", type=int, default=4, help="client processes (each its own event loop)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="a level stops sending after this")
    p.add_argument("--n-items", type=int, default=10)
    p.add_argument("--server-pid", type=int, default=None, help="read the server's CPU from /proc (local)")
    p.add_argument(
        "--serve-frontends",
        default=None,
        help="start `genrec serve --frontends N` on the url's port for each N of this list in turn (e.g. 1,2)",
    )
    p.add_argument("--serve-args", default="", help="more `genrec serve` flags with --serve-frontends")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    check_loopback(args.url)

    import shlex

    from bench.common import save
    from genrec.run import RunDir

    run = RunDir(args.run)
    jobs, tg = make_jobs(run, args.mode, args.n_items)
    tg.model = args.model or tg.model

    def levels(server_pid: int | None) -> list[dict[str, Any]]:
        out = []
        for c in args.concurrency.split(","):
            out.append(
                level(
                    args.url,
                    tg,
                    jobs,
                    clients=int(c),
                    requests=args.requests,
                    processes=args.processes,
                    max_s=args.max_seconds,
                    server_pid=server_pid,
                )
            )
            print(out[-1], flush=True)
        return out

    common = {"url": args.url, "mode": args.mode, "n_items": args.n_items, "processes": args.processes}
    if not args.serve_frontends:
        save(args.out, {**common, "levels": levels(args.server_pid)})
        return
    servers = []
    for n in [int(x) for x in args.serve_frontends.split(",")]:
        proc = start_server(args.run, args.url, n, shlex.split(args.serve_args))
        try:
            servers.append({"frontends": n, "levels": levels(proc.pid)})
        finally:
            stop_server(proc)
    save(args.out, {**common, "serve_args": args.serve_args, "servers": servers})


if __name__ == "__main__":
    main()
