"""Sequence augmentation (train.augment) measured on a prepared run, choosing on the validation split only.

Each variant is trained from a copy of a base run that `genrec prepare`, `genrec build-ids` and `genrec train`
made (data, IDs, embeddings and the collaborative retriever are shared; only the LM and its fusion weight are
made again), so the grid does not retrain the same seeded SASRec retriever for every variant. What a variant
reports is what `genrec train` records for selection: the fusion weight chosen on the validation users and
their NDCG@10 at every weight (0: the LM alone). Test figures come from `genrec evaluate` on the chosen run.

    genrec quickstart ... or: genrec prepare --run B -c tiny.yaml && genrec build-ids --run B && genrec train --run B
    python -m bench.augment --base B --run B-crop --set train.augment=[crop] --out bench/results/x.json
    genrec evaluate --run B && genrec evaluate --run B-crop
    python -m bench.augment --base B --run B-crop --paired-test     # test: B-crop minus B, user by user
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.common import paired_runs, save

SHARED = ("catalog.parquet", "interactions.parquet", "item_embeddings.npy", "item_ids.json", "codebooks.npz")


def copy_base(base: Path, run: Path) -> None:
    """The base run's data, IDs and retriever in a fresh run directory; run.json without the base's training
    and fusion records, so that the variant's own are made (the retriever record stays: it is the same model)."""
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    for name in (*SHARED, "config.yaml"):
        if (base / name).exists():
            shutil.copy2(base / name, run / name)
    shutil.copytree(base / "retriever", run / "retriever")
    meta = json.loads((base / "run.json").read_text())
    meta.pop("train", None)
    meta.get("retrieval", {}).pop("fusion", None)
    (run / "run.json").write_text(json.dumps(meta, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="a trained run (prepare, build-ids, train)")
    p.add_argument("--run", required=True, type=Path, help="the variant's run directory (replaced)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="section.field=value")
    p.add_argument("--out", default=None)
    p.add_argument("--paired-test", action="store_true", help="compare the two runs' test evaluations only")
    args = p.parse_args()
    if args.paired_test:
        save(
            args.out, {"base": str(args.base), "run": str(args.run), "test": paired_runs(args.run, args.base)}
        )
        return

    from genrec.cli import _setup_logging
    from genrec.config import apply_overrides
    from genrec.evaluation import fusion_weight_for
    from genrec.recommender import Recommender
    from genrec.run import RunDir
    from genrec.training import train

    _setup_logging()
    copy_base(args.base, args.run)
    rd = RunDir(args.run)
    cfg = apply_overrides(rd.load_config(), args.sets)
    rd.save_config(cfg)
    started = time.time()
    summary = train(rd, cfg)
    fusion = fusion_weight_for(Recommender.load(rd), cfg)
    save(
        args.out,
        {
            "base": str(args.base),
            "run": str(args.run),
            "set": args.sets,
            "seconds": round(time.time() - started, 1),
            "train": summary,
            "fusion": fusion,
        },
    )


if __name__ == "__main__":
    main()
