"""Where a run's LM ranks held-out items (data.cold_items) over the whole catalogue: the rank of each cold-protocol
user's test item among the items they have not seen, one forward pass per user (atomic IDs: every item's score), for
the rows as the run has them and with the held-out rows put back where model.id_init starts them.

What the cold protocol's Recall@10 of 0 does not say: whether held-out items sit just below the top 10, at chance,
or at the bottom. Warm test items of as many users are ranked the same way for comparison.

    python -m bench.cold_rank --run runs/sm-ml2 --out bench/results/cpu_cold_rank_ml100k_smollm2.json
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from bench.common import save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="A trained run with data.cold_items and atomic IDs.")
    ap.add_argument("--out", default=None, help="JSON file to write.")
    args = ap.parse_args()
    import torch
    from tqdm.auto import tqdm

    from genrec.data import leave_one_out
    from genrec.modeling import set_id_rows
    from genrec.recommender import Recommender
    from genrec.run import RunDir
    from genrec.training import id_init_vectors

    run = RunDir(args.run)
    rec = Recommender.load(run, device="cpu")
    cfg = run.load_config()
    cold = sorted(run.cold_items(cfg))
    if rec.ids.scheme != "atomic" or not cold:
        raise SystemExit(f"{run.path}: needs atomic IDs and data.cold_items")
    token_of_item = torch.tensor(rec._item_token_ids()[:, 0])
    test = leave_one_out(rec.data, "test")
    cold_users = [ex for ex in test if ex.target in set(cold)]
    warm_users = [ex for ex in test if ex.target not in set(cold)][: len(cold_users)]
    model = rec.engine.model  # type: ignore[attr-defined]  # the transformers engine's

    def ranks(examples: list[Any], what: str) -> list[int]:
        out = []
        for ex in tqdm(examples, desc=f"ranking {what}", unit="user"):
            ids = rec.engine.encode_messages(rec.builder.messages(list(ex.history), ex.user))
            with torch.no_grad():
                scores = model(torch.tensor([ids])).logits[0, -1][token_of_item].double().numpy()
            scores[list(ex.history)] = -np.inf
            out.append(int((scores > scores[ex.target]).sum()) + 1)
        return out

    def summary(r: list[int]) -> dict[str, float]:
        a = np.asarray(r)
        return {"median": float(np.median(a)), "mean": float(a.mean()), "in_top_10": int((a <= 10).sum())}

    result: dict[str, Any] = {
        "run": str(run.path),
        "items": len(rec.ids),
        "cold_users": len(cold_users),
        "cold_rows": run.meta().get("cold_rows", "start"),
        "cold_targets": summary(ranks(cold_users, "held-out targets")),
        "warm_targets": summary(ranks(warm_users, "warm targets")),
    }
    # Mapped rows: rank again with them where id_init started them (text: the title vectors as they are;
    # `items` rescales its vectors, not redone here).
    if run.meta().get("cold_rows") and cfg.model.id_init == "text":
        vectors = id_init_vectors(
            run, cfg, rec.ids, model, rec.engine.tokenizer, titles=rec.data.catalog.titles
        )
        held = {rec.ids.item_string(i) for i in cold}
        set_id_rows(model, rec.engine.tokenizer, {t: v for t, v in vectors.items() if t in held})
        result["cold_targets_start_rows"] = summary(ranks(cold_users, "held-out targets, start rows"))
    save(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
