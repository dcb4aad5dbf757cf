"""Cost of a batch job's input pass, per format (JSONL, gzipped JSONL, Parquet), on synthetic users (no run
needed):

* `scan`: what `genrec generate` does once at start: the input's sha256 (the manifest's stamp) and its
  row count (the progress bar's total), in one read;
* `all rows`: every row parsed (shard 0/1 from the start);
* `shard k/n` and `resume past p%`: the rows one shard of n keeps, and the rows a job resumed after p% of
  its input still has to do, read as `genrec generate` reads them (rows it passes over are not parsed;
  Parquet row groups before the resume point are not read: the file is written in groups of 100,000 rows),
  next to parsing every row and dropping the others (how it read them before).

python -m bench.input_read --users 1000000 --shards 16 --resume-at 0.9
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_users(folder: Path, users: int, seed: int = 0) -> list[Path]:
    """users.jsonl, users.jsonl.gz (gzip's default level 6, as Spark writes) and users.parquet: a user id and a
    history of 3-30 item ids per row."""
    import gzip
    import shutil

    import pandas as pd

    rng = random.Random(seed)
    rows = [
        {"user": f"U{i:08d}", "history": [f"I{rng.randrange(20_000):05d}" for _ in range(rng.randint(3, 30))]}
        for i in range(users)
    ]
    jsonl = folder / "users.jsonl"
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    gz = folder / "users.jsonl.gz"
    with open(jsonl, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    parquet = folder / "users.parquet"
    pd.DataFrame(rows).to_parquet(parquet, row_group_size=100_000)  # row groups a resumed job can pass over
    return [jsonl, gz, parquet]


def rows_kept(path: Path, keep: Callable[[int], bool] | None, start: int = 1) -> int:
    """Rows read as `genrec generate` reads them: the ones `keep` rejects, and those before `start`, are not
    parsed (nor are Parquet row groups before `start` read)."""
    from genrec.batch.input import read_rows

    return sum(1 for _ in read_rows(path, keep, start=start))


def rows_parsed_then_dropped(path: Path, keep: Callable[[int], bool] | None, start: int = 1) -> int:
    """Every row parsed, then the ones `keep` rejects and those before `start` dropped (how the job read its
    input before)."""
    from genrec.batch.input import read_rows

    return sum(1 for line, _, _ in read_rows(path) if line >= start and (keep is None or keep(line)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=16, help="n of the shard k/n timed (k = 0)")
    p.add_argument("--resume-at", type=float, default=0.9, help="fraction of the input already committed")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement; the best counts")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from bench.common import best_of, save
    from genrec.batch.input import scan_input

    n, skip = args.shards, int(args.users * args.resume_at)
    subsets: dict[str, tuple[Callable[[int], bool] | None, int]] = {  # (keep, start) as genrec generate reads
        f"shard 0/{n}": (lambda line: (line - 1) % n == 0, 1),
        f"resume past {args.resume_at:.0%}": (None, skip + 1),
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_users(Path(tmp), args.users):
            fmt = path.name.removeprefix("users.")
            scan_s, (_, files) = best_of(args.repeats, scan_input, path)
            rows = sum(n for _, n in files)
            all_s, _ = best_of(args.repeats, rows_kept, path, None)
            r: dict[str, Any] = {
                "bytes": path.stat().st_size,
                "rows": rows,
                "scan_s": round(scan_s, 4),
                "all_rows_s": round(all_s, 4),
            }
            for name, (keep, start) in subsets.items():
                kept_s, kept = best_of(args.repeats, rows_kept, path, keep, start)
                before_s, before = best_of(args.repeats, rows_parsed_then_dropped, path, keep, start)
                assert kept == before, (name, kept, before)
                r[name] = {
                    "rows": kept,
                    "s": round(kept_s, 4),
                    "parse_all_then_drop_s": round(before_s, 4),
                    "speedup": round(before_s / kept_s, 2),
                }
            results[fmt] = r
            print(fmt, json.dumps(r))
    save(args.out, {"benchmark": "input_read", "users": args.users, "results": results})


if __name__ == "__main__":
    main()
