"""A preparation worker's CPU work per user in a batch job (`genrec generate --prep-workers N`; genrec.prep):
what one worker process spends to hand the ranking process a batch (BENCHMARKS.md, "Offline batch throughput").

Each worker renders every user's prompt in the template sandbox, tokenizes the conversations (one batched
call), searches the retriever's index, builds the candidate tries, lays them out for exact tree scoring and
pickles the batch to send it back. N workers on N free cores prepare at most N x `bound_users_per_s` users/s.
`total_ms_per_user` is `Recommender.prepare` timed whole (render + tokenize + retrieve) plus tries, layouts
and pickling; the steps are also timed one by one. The ranking process's cost to unpickle a batch is reported
apart (bench.ranking_host times the rest of its work). Without any model, one thread, best of `--repeats`:

    python -m bench.prep_worker --run runs/demo --users 1024
"""

from __future__ import annotations

import pickle
from typing import Any

from bench.common import batch_job_parser


def main() -> None:
    args = batch_job_parser(__doc__).parse_args()

    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in a worker: the workers are the parallelism
    import torch

    from bench.common import best_ms_per_user, save
    from genrec.config import RankingOptions
    from genrec.data import leave_one_out
    from genrec.engines.hf import tree_layouts
    from genrec.prep import prompt_recommender
    from genrec.recommender import PreparedBatch, history_requests

    torch.set_num_threads(1)
    rec = prompt_recommender(args.run)  # what a worker holds: no model
    examples = leave_one_out(rec.data, "test")
    examples = (examples * (args.users // len(examples) + 1))[: args.users]

    def requests() -> list[list[Any]]:  # fresh requests: rendering fills in `messages`
        reqs = history_requests(
            [e.history for e in examples],
            RankingOptions(n_items=args.k, candidates="retriever", n_candidates=args.n_candidates),
            users=[e.user for e in examples],
        )
        return [reqs[s : s + args.batch] for s in range(0, len(reqs), args.batch)]

    batches = requests()
    builder = rec.builder
    convs = [[builder.messages(r.history, r.user) for r in b] for b in batches]
    prepared = [rec.prepare(b) for b in batches]
    tries = [rec.prepared_tries(b, pb) for b, pb in zip(batches, prepared, strict=True)]
    layouts = [tree_layouts(t, "exact", 0) for t in tries]
    sent = [
        PreparedBatch(pb.prompts, pb.retrieved, [lays.get(i) for i in range(len(b))])
        for b, pb, lays in zip(batches, prepared, layouts, strict=True)
    ]

    def prepare_all() -> None:
        for b in requests():
            rec.prepare(b)

    n, reps = args.users, args.repeats
    per_user = {
        "render": best_ms_per_user(
            lambda: [[builder.messages(r.history, r.user) for r in b] for b in batches], n, reps
        ),
        "tokenize": best_ms_per_user(lambda: [rec.engine.encode_many(c) for c in convs], n, reps),
        "retrieve": best_ms_per_user(lambda: [rec._retrieve(b) for b in batches], n, reps),
        "tries": best_ms_per_user(
            lambda: [rec.prepared_tries(b, pb) for b, pb in zip(batches, prepared, strict=True)], n, reps
        ),
        "layouts": best_ms_per_user(
            lambda: [
                tree_layouts(rec.prepared_tries(b, pb), "exact", 0)
                for b, pb in zip(batches, prepared, strict=True)
            ],
            n,
            reps,
        ),
        "pickle": best_ms_per_user(lambda: [pickle.dumps(s) for s in sent], n, reps),
    }
    sent_bytes = [pickle.dumps(s) for s in sent]
    unpickle = best_ms_per_user(lambda: [pickle.loads(b) for b in sent_bytes], n, reps)
    # tries are rebuilt inside "layouts" (a trie keeps its nodes once walked): count the layout work alone
    per_user["layouts"] = round(max(per_user["layouts"] - per_user["tries"], 0.0), 4)
    whole = best_ms_per_user(prepare_all, n, reps)
    total = round(whole + per_user["tries"] + per_user["layouts"] + per_user["pickle"], 4)
    save(
        args.out,
        {
            "users": n,
            "batch": args.batch,
            "n_candidates": args.n_candidates,
            "template": rec.template_name,
            "mean_prompt_tokens": round(sum(len(x) for pb in prepared for x in pb.prompts) / n, 1),
            "pickled_kb_per_user": round(sum(map(len, sent_bytes)) / n / 1024, 2),
            "ms_per_user": per_user,
            "prepare_ms_per_user": whole,
            "total_ms_per_user": total,
            "bound_users_per_s": round(1000 / total),
            "ranking_process_unpickle_ms_per_user": unpickle,
        },
    )


if __name__ == "__main__":
    main()
