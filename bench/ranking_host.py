"""The ranking process's own CPU work per user in a batch job with preparation workers: what is left to the
process that drives the GPU besides the model's kernels (BENCHMARKS.md, "Offline batch throughput").

With workers (`genrec generate --prep-workers N`), prompts, retrieval and tree layouts arrive made; the ranking
process still packs each batch's inputs, lays out the top-k read-out and the output head's index arrays, and
turns the top items into recommendations. On a GPU that work overlaps the device's (`Recommender.rank_stream`),
so it bounds the job's users/s from above. Timed here without any model call, per step, best of `--repeats`:

    python -m bench.ranking_host --run runs/demo --users 1024
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.common import batch_job_parser
from genrec.config import ID_SOFTMAX, RankingOptions


def main() -> None:
    p = batch_job_parser(__doc__)
    p.add_argument("--id-softmax", choices=["run", *ID_SOFTMAX], default="run")
    args = p.parse_args()

    import torch

    from bench.common import best_ms_per_user, save
    from genrec.data import leave_one_out
    from genrec.decoding import Ranked
    from genrec.decoding.tree import TopItems
    from genrec.engines.hf import HFEngine, TreeScorer, tree_layouts
    from genrec.id_softmax import softmax_groups
    from genrec.modeling import load_trained
    from genrec.recommender import Recommender, history_requests
    from genrec.retrieval import Retriever
    from genrec.run import RunDir

    torch.set_num_threads(1)  # the ranking process's Python and numpy use one core
    run = RunDir(args.run)
    ids = run.load_ids()
    softmax = run.trained_id_softmax() if args.id_softmax == "run" else args.id_softmax
    engine = HFEngine(
        *load_trained(run.model_dir()),
        search="exact",
        softmax_groups=softmax_groups(ids.level_tokens(), softmax),
    )
    rec = Recommender(run, run.load_config(), run.load_data(), ids, engine, Retriever(run.load_embeddings()))
    examples = leave_one_out(rec.data, "test")
    examples = (examples * (args.users // len(examples) + 1))[: args.users]
    reqs = history_requests(
        [e.history for e in examples],
        options=RankingOptions(n_items=args.k, candidates="retriever", n_candidates=args.n_candidates),
    )
    batches = []  # as the workers send them: prompts, candidates and layouts made
    for s in range(0, len(reqs), args.batch):
        batch = reqs[s : s + args.batch]
        prepared = rec.prepare(batch)
        found = tree_layouts(rec.prepared_tries(batch, prepared), "exact", 0)
        batches.append((batch, prepared.prompts, [found[i] for i in range(len(batch))]))
    scorer = TreeScorer(engine.model, pad_id=engine.pad_id, softmax=engine.softmax)
    widths = [max(len(x) + lay.n_inputs for x, lay in zip(ps, lays, strict=True)) for _, ps, lays in batches]

    def edges(lays: Any, width: int) -> None:
        _, _, edge_state, tok = scorer.edge_index(lays, width)
        if scorer.softmax is not None:
            scorer.softmax.by_group(edge_state, tok)

    def recommendations(batch: Any, lays: Any) -> None:  # the read-out of top items the device sent back
        ranked = [Ranked(lay.items[: args.k].tolist(), [0.0] * min(args.k, len(lay.items))) for lay in lays]
        rec.recommendations(batch, ranked)

    steps = {
        "pack_inputs": lambda b, ps, lays, w: scorer.pack(ps, lays, len(lays), w),
        "top_items_index": lambda b, ps, lays, w: TopItems(lays, args.k),
        "edge_index": lambda b, ps, lays, w: edges(lays, w),
        "recommendations": lambda b, ps, lays, w: recommendations(b, lays),
    }

    def every_batch(step: Callable[..., Any]) -> Callable[[], None]:
        def run() -> None:
            for (b, ps, lays), w in zip(batches, widths, strict=True):
                step(b, ps, lays, w)

        return run

    per_user = {
        name: best_ms_per_user(every_batch(fn), args.users, args.repeats) for name, fn in steps.items()
    }
    total = sum(per_user.values())
    save(
        args.out,
        {
            "users": args.users,
            "batch": args.batch,
            "n_candidates": args.n_candidates,
            "id_softmax": softmax,
            "mean_prompt_tokens": round(sum(len(x) for _, ps, _ in batches for x in ps) / args.users, 1),
            "mean_tree_tokens": round(
                sum(lay.n_inputs for *_, lays in batches for lay in lays) / args.users, 1
            ),
            "ms_per_user": per_user,
            "total_ms_per_user": round(total, 4),
            "bound_users_per_s": round(1000 / total),
        },
    )


if __name__ == "__main__":
    main()
