"""The constrained beam search's own CPU cost, with a step model that costs nothing.

On a GPU the model's forward passes are cheap and the search's bookkeeping (expanding beams over the
trie, picking the top continuations) is a visible share of a batch; this times that share alone on the
run's real candidate tries (full catalogue minus each user's history):

    python -m bench.search_overhead --run runs/demo --users 500 --beam 10,20
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch


class FreeModel:
    """A StepModel that does no model work (fixed, distinct log-probs): what is timed is the search itself."""

    def start(self, prompts: Sequence[Sequence[int]], allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [-0.001 * torch.arange(len(a), dtype=torch.float32) for a in allowed]

    def step(
        self, parents: Sequence[int], tokens: Sequence[int], allowed: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        return self.start([], allowed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--beam", default="10,20")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from bench.common import save
    from genrec.config import RankingOptions
    from genrec.data import leave_one_out
    from genrec.decoding import constrained_beam_search
    from genrec.recommender import RankRequest, Recommender
    from genrec.run import RunDir

    rec = Recommender.load(RunDir(args.run), device="cpu")
    examples = leave_one_out(rec.data, "test")[: args.users]
    tries = [
        rec.candidate_trie(
            RankRequest(list(e.history), options=RankingOptions(n_items=10, candidates="all"), user=e.user)
        )
        for e in examples
    ]
    prompts = [[0]] * len(tries)
    ms_per_batch: dict[str, float] = {}
    results = {
        "users": len(tries),
        "items": len(rec.catalog),
        "depth": rec.ids.depth,
        "ms_per_batch": ms_per_batch,
    }
    for width in (int(w) for w in args.beam.split(",")):
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            constrained_beam_search(FreeModel(), prompts, tries, beam_width=width)
            times.append(time.perf_counter() - started)
        ms_per_batch[f"beam{width}"] = round(1000 * min(times), 1)
    save(args.out, results)


if __name__ == "__main__":
    main()
