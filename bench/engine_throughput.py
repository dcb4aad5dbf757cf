"""Engine throughput and latency: genrec's constrained ranking (beam search, or exact tree scoring on
the transformers engine) vs unconstrained greedy decoding of the same number of tokens vs vLLM's
built-in beam search at the same width, same model, same prompts. Greedy is timed on prompts already
tokenized (`greedy_users_per_s`) and with rendering and tokenizing them, as a batch job must
(`greedy_with_prompts_users_per_s`); genrec's figure always includes that work and retrieval.

Every timed pass starts with vLLM's prefix cache emptied (`cold`): a batch job meets each user's prompt once, so
what it may reuse is what its users share (the template's opening), which the pass caches as it goes. Before, the
greedy passes ran on the prompts the constrained pass had just cached, which left greedy little prefill to do;
`greedy_users_per_s_prompts_cached` keeps that figure for comparison.

    python -m bench.engine_throughput --run runs/demo --engine vllm --users 2000 --beam 10
    python -m bench.engine_throughput --run runs/demo --engine vllm --build-model 1024,9,16,4,2816 ...
    python -m bench.engine_throughput --run runs/demo --engine hf --candidates retriever --search exact

--build-model H,L,heads,kv_heads,mlp builds a random-init Qwen2 of that size with the run's tokenizer
(for speed only: a >= 100M-parameter model without training it). Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

from genrec.config import ID_SOFTMAX, RankingOptions

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def build_model(run: Any, spec: str, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer

    from genrec.config import ModelConfig
    from genrec.modeling import build_tiny

    h, layers, heads, kv, mlp = (int(x) for x in spec.split(","))
    tok = AutoTokenizer.from_pretrained(run.model_dir())
    cfg = ModelConfig(
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=mlp,
        max_position_embeddings=2048,
    )
    model = build_tiny(cfg, tok).to(torch.bfloat16)
    print(f"built random Qwen2 with {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cold(engine: Any) -> None:
    """Leave no prompt cached from an earlier pass (vLLM: its prefix cache emptied; the transformers engine keeps
    nothing between calls). Called before a pass's clock starts."""
    llm = getattr(engine, "llm", None)
    if llm is not None and not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not empty its prefix cache (requests still running?)")


def timed_cold(engine: Any, fn: Any) -> float:
    """`timed(fn)` with the engine's cache emptied first, outside the clock."""
    cold(engine)
    return timed(fn)


def rank_from(rec: Any, prepared: Any) -> dict[str, float]:
    """Rank every prepared batch as the batch job does (`Recommender.rank_stream`, one batch launched ahead); the
    wall time and its split between waiting for the preparation workers and the rest (ranking: on a GPU it ends
    with the last top items' transfer, so it includes the device's work not overlapped)."""
    wait = 0.0

    def timed_batches() -> Any:
        nonlocal wait
        while True:
            t0 = time.perf_counter()
            got = next(prepared, None)
            wait += time.perf_counter() - t0
            if got is None:
                return
            yield got

    start = time.perf_counter()
    for _ in rec.rank_stream(timed_batches()):
        pass
    total = time.perf_counter() - start
    return {"seconds": total, "waiting_for_workers_s": round(wait, 3), "ranking_s": round(total - wait, 3)}


def profiled(fn: Any, table: Path | None) -> dict[str, Any]:
    """`fn` under torch.profiler: its wall time and, on a GPU, the kernels' total time, i.e. how busy the GPU
    was (a lower bound: profiling slows the CPU side). The ranking process's top operators go to `table`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        wall = timed(fn)
    events = prof.key_averages()
    out: dict[str, Any] = {"profiled_s": round(wall, 3)}
    if cuda:
        kernels = sum(e.self_device_time_total for e in events) / 1e6
        out |= {"gpu_kernels_s": round(kernels, 3), "gpu_busy_fraction": round(kernels / wall, 3)}
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    return out


def with_prep_workers(args: Any, rec: Any, engine: Any, reqs: list[Any], depth: int) -> dict[str, Any]:
    """The constrained job and the greedy job (prompts only) with N preparation workers ahead of the engine."""
    from genrec.prep import PrepPool

    def fresh(mode: str | None = None) -> list[Any]:
        return [dataclasses.replace(r, messages=None, options=r.options.with_(candidates=mode)) for r in reqs]

    def batches(rs: list[Any]) -> Any:
        return ((None, rs[s : s + args.batch]) for s in range(0, len(rs), args.batch))

    def ready(pool: Any, rs: list[Any]) -> None:  # workers loaded and through their first batches
        pool.warm()
        for _ in pool.prepared(batches(rs[: 2 * args.batch])):
            pass

    with PrepPool(args.run, args.prep_workers, layouts=getattr(engine, "layout_policy", None)) as pool:
        ready(pool, fresh())
        cold(engine)
        split = rank_from(rec, pool.prepared(batches(fresh())))
        secs = split.pop("seconds")
        if args.profile:
            cold(engine)
            split |= profiled(
                lambda: rank_from(rec, pool.prepared(batches(fresh()))),
                Path(args.out).with_suffix(".profile.txt") if args.out else None,
            )
    with PrepPool(args.run, args.prep_workers) as pool:  # greedy needs prompts only: no retrieval, no layouts
        greedy_reqs = fresh("all")
        ready(pool, greedy_reqs)
        cold(engine)
        secs_g = timed(
            lambda: [
                engine.greedy(b.prompts, max_tokens=depth) for _, _, b in pool.prepared(batches(greedy_reqs))
            ]
        )
    out = {
        "prep_workers": args.prep_workers,
        "constrained_users_per_s_prep_workers": round(args.users / secs, 1),
        "ranking_process_prep_workers": split,
        "greedy_with_prompts_users_per_s_prep_workers": round(args.users / secs_g, 1),
    }
    out["constrained_vs_greedy_with_prompts_prep_workers"] = round(
        out["constrained_users_per_s_prep_workers"] / out["greedy_with_prompts_users_per_s_prep_workers"], 3
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--batch", type=int, default=512, help="users per engine call for throughput")
    p.add_argument("--candidates", choices=["all", "retriever"], default="all")
    p.add_argument("--n-candidates", type=int, default=200, help="retriever candidates per user")
    p.add_argument(
        "--search",
        choices=["auto", "beam", "exact"],
        default="auto",
        help="hf engine: exact tree scoring for small tries (auto), or always beam / exact",
    )
    p.add_argument("--max-tree-tokens", type=int, default=1024, help="hf engine: auto's tree size limit")
    p.add_argument("--latency-requests", type=int, default=50)
    p.add_argument(
        "--prep-workers",
        type=int,
        default=0,
        help="also time the jobs with prompts (and retrieval) prepared by N worker processes (genrec.prep)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --prep-workers: one more pass under torch.profiler, for how busy the GPU is while the ranking "
        "process ranks (its top operators beside --out, as .profile.txt)",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="hf engine on a GPU: tree scoring with eager model calls instead of CUDA graphs (eval.cuda_graphs)",
    )
    p.add_argument("--build-model", default=None, help="H,L,heads,kv_heads,mlp: random Qwen2 for speed tests")
    p.add_argument(
        "--id-softmax",
        choices=["run", *ID_SOFTMAX],
        default="run",
        help="score as the run's model was trained (run.json), or force the vocabulary / level softmax "
        "(model.id_softmax) on either engine, e.g. for a --build-model speed test",
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from bench.common import percentiles, save
    from genrec.data import leave_one_out
    from genrec.id_softmax import softmax_groups
    from genrec.recommender import Recommender, history_requests
    from genrec.retrieval import Retriever
    from genrec.run import RunDir

    run = RunDir(args.run)
    model_dir = run.model_dir()
    if args.build_model:
        model_dir = build_model(run, args.build_model, Path("/tmp/genrec-bench-model"))
    ids = run.load_ids()
    softmax = run.trained_id_softmax() if args.id_softmax == "run" else args.id_softmax
    groups = softmax_groups(ids.level_tokens(), softmax)
    if args.engine == "vllm":
        from genrec.engines.vllm import VLLMEngine

        engine: Any = VLLMEngine(model_dir, dtype=args.dtype, softmax_groups=groups)
    else:
        from genrec.engines.hf import HFEngine
        from genrec.modeling import load_trained

        engine = HFEngine(
            *load_trained(model_dir),
            search=args.search,
            max_tree_tokens=args.max_tree_tokens,
            cuda_graphs=not args.no_cuda_graphs,
            softmax_groups=groups,
        )
    rec = Recommender(run, run.load_config(), run.load_data(), ids, engine, Retriever(run.load_embeddings()))
    examples = leave_one_out(rec.data, "test")
    examples = (examples * (args.users // len(examples) + 1))[: args.users]
    reqs = history_requests(
        [e.history for e in examples],
        RankingOptions(n_items=args.beam, candidates=args.candidates, n_candidates=args.n_candidates),
        users=[e.user for e in examples],
    )
    prompts = engine.encode_many([rec.builder.messages(r.history, r.user) for r in reqs])
    depth = rec.ids.depth
    results: dict[str, Any] = {
        "engine": args.engine,
        "users": args.users,
        "beam": args.beam,
        "depth": depth,
        "candidates": args.candidates,
        "n_candidates": args.n_candidates if args.candidates == "retriever" else None,
        "search": args.search if args.engine == "hf" else "beam",
        "id_softmax": softmax,
        "items": len(rec.catalog),
        "mean_prompt_tokens": round(statistics.mean(map(len, prompts)), 1),
    }
    # warm-up (compilation, CUDA graphs, caches)
    rec.rank_requests(reqs[:8])
    engine.greedy(prompts[:8], max_tokens=depth)

    def constrained() -> None:  # as the batch job without workers: prepared here, one batch launched ahead
        batches = (reqs[s : s + args.batch] for s in range(0, len(reqs), args.batch))
        for _, _, ranked in rec.rank_stream((None, b, rec.prepare(b)) for b in batches):
            assert all(len({x.item for x in o}) == len(o) for o in ranked)

    def greedy() -> None:
        for s in range(0, len(prompts), args.batch):
            engine.greedy(prompts[s : s + args.batch], max_tokens=depth)

    secs = timed_cold(engine, constrained)
    results["constrained_users_per_s"] = round(args.users / secs, 1)
    secs_g = timed_cold(engine, greedy)
    results["greedy_users_per_s"] = round(args.users / secs_g, 1)
    if args.engine == "vllm":  # the same prompts again, every one cached by the pass before
        results["greedy_users_per_s_prompts_cached"] = round(args.users / timed(greedy), 1)

    def greedy_with_prompts() -> None:  # the same job end to end: render and tokenize the prompts too
        for s in range(0, len(reqs), args.batch):
            batch = reqs[s : s + args.batch]
            ids = engine.encode_many([rec.builder.messages(r.history, r.user) for r in batch])
            engine.greedy(ids, max_tokens=depth)

    results["greedy_with_prompts_users_per_s"] = round(
        args.users / timed_cold(engine, greedy_with_prompts), 1
    )
    results["constrained_vs_greedy_throughput"] = round(
        results["constrained_users_per_s"] / results["greedy_users_per_s"], 3
    )
    if args.engine == "vllm":
        n_beam = min(args.users, 500)
        secs_b = timed_cold(
            engine,
            lambda: engine.builtin_beam_search(prompts[:n_beam], beam_width=args.beam, max_tokens=depth),
        )
        results["vllm_beam_search_users_per_s"] = round(n_beam / secs_b, 1)
        results["constrained_vs_vllm_beam"] = round(
            results["constrained_users_per_s"] / results["vllm_beam_search_users_per_s"], 2
        )
    # one-request latency of a warm server: each request once untimed first (CUDA graphs for its shape,
    # as vLLM captures its own at start-up), then timed
    for r, prompt in zip(reqs[: args.latency_requests], prompts, strict=False):
        rec.rank_requests([r])
        engine.greedy([prompt], max_tokens=depth)
    if args.prep_workers:
        results.update(with_prep_workers(args, rec, engine, reqs, depth))
    # timed on prompts not cached: the untimed calls above cached them in vLLM
    fresh = [dataclasses.replace(r, messages=None) for r in reqs[: args.latency_requests]]  # render each time
    lat_c = [timed_cold(engine, lambda r=r: rec.rank_requests([dataclasses.replace(r)])) for r in fresh]
    results["constrained_latency"] = percentiles(lat_c)
    lat_g = [
        timed_cold(engine, lambda p=p: engine.greedy([p], max_tokens=depth))
        for p in prompts[: args.latency_requests]
    ]
    results["greedy_latency"] = percentiles(lat_g)
    results["latency_ratio_p50"] = round(
        results["constrained_latency"]["p50_ms"] / results["greedy_latency"]["p50_ms"], 2
    )
    static = getattr(engine, "static", None)
    if static is not None:
        results["cuda_graphs"] = {
            "captured": static.captured,
            "kept": len(static.graphs),
            "first_use_gap": static.gap,
            "off": static.disabled,
        }
    save(args.out, results)


if __name__ == "__main__":
    main()
