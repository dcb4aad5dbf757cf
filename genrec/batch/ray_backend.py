"""Batch generation on a Ray cluster: the input's shards fanned out to Ray workers.

Each Ray task runs `genrec.batch.generate` on shard i/n of the input (every n-th row), with its
own engine and its own chunk manifest, writing `<output>.shards/shard-i-of-n.<ext>`. The driver
then merges the shards into `<output>` in input-line order (a streamed k-way merge) and the
rejects likewise. So everything the single-machine path guarantees holds per shard: streamed
input, chunks committed atomically, rejects with line numbers, and `resume=True` re-running only
unfinished shards from their last committed chunk, after a worker or the driver died.

Why tasks running genrec's engine rather than Ray Data's vLLM processor: that processor runs
plain vLLM generation (sampling parameters per row); genrec's constrained beam search is a loop
over engine steps that has to run beside the engine, so each worker holds a whole `Recommender`
(`engine="vllm"` with one GPU per worker on a cluster; `hf` on CPU). Input and run directory must
be on storage every node can read (NFS, a shared volume); the output folder likewise.
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genrec.batch import check_options, output_lock, output_schema
from genrec.batch.input import count_rows, scan_input
from genrec.batch.manifest import describe_rejects, rejects_path, writing
from genrec.errors import GenrecError, stopped_by
from genrec.run import atomic_file

logger = logging.getLogger(__name__)


def _shard_task(
    run: str, input_path: str, out: str, shard: tuple[int, int], opts: dict[str, Any]
) -> dict[str, Any]:
    """Body of one Ray task: load the run and rank one shard (resumable)."""
    from genrec.batch import generate
    from genrec.recommender import Recommender
    from genrec.run import RunDir

    rec = Recommender.load(
        RunDir(run), backend=opts.pop("engine"), device=opts.pop("device"), search=opts.pop("search")
    )
    resume = Path(out).with_name(Path(out).name + ".parts").exists() or Path(out).exists()
    return generate(rec, input_path, out, shard=shard, resume=resume, progress=False, **opts)


def generate_ray(
    run: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    workers: int,
    resume: bool = False,
    engine: str = "hf",
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    device: str | None = None,
    search: str | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Rank every input row with `workers` Ray tasks; `options` go to `genrec.batch.generate`."""
    import ray

    check_options(**options)  # here, not in each task
    output = Path(output_path)
    with output_lock(output):  # the driver holds the final output; each shard task holds its own
        shards_dir = output.with_name(output.name + ".shards")
        if not resume and (shards_dir.exists() or output.exists()):
            raise GenrecError(
                f"{output} or {shards_dir} exists from an earlier run: pass --resume, or remove them"
            )
        if workers < 1:
            raise GenrecError(f"--workers must be >= 1, got {workers}")
        with writing(shards_dir):
            shards_dir.mkdir(parents=True, exist_ok=True)
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        task = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_retries=2)(_shard_task)
        outs = [shards_dir / f"shard-{k}-of-{workers}{output.suffix}" for k in range(workers)]
        opts = {**options, "engine": engine, "device": device, "search": search}
        try:
            refs = [
                task.remote(
                    str(Path(run).resolve()),
                    str(Path(input_path).resolve()),
                    str(o),
                    (k, workers),
                    dict(opts),
                )
                for k, o in enumerate(outs)
            ]
            summaries = _wait_with_progress(
                ray,
                refs,
                outs,
                total=sum(n for _, n in scan_input(Path(input_path), digest=False)[1]),
                progress=progress,
            )
        except (
            BaseException
        ) as e:  # Ctrl-C on the driver (the CLI exits quietly on it), a task failed for good
            why = stopped_by(e)
            logger.warning(
                "generate (ray) %s: %d input rows done; each shard keeps its committed chunks in %s, and the same "
                "command with --resume goes on from there",
                why,
                sum(_committed(o) for o in outs),
                shards_dir,
            )
            raise
        finally:
            if started_here:
                ray.shutdown()
        with writing(output):
            merge_shards(outs, output)
        kinds: collections.Counter[str] = collections.Counter()
        for s in summaries:
            kinds.update(s["reject_kinds"])
        summary = {
            "rows": sum(s["rows"] for s in summaries),
            "rejects": sum(s["rejects"] for s in summaries),
            "reject_kinds": dict(kinds.most_common()),
            "shards": workers,
            "output": str(output),
            "rejects_file": str(rejects_path(output)),
        }
        shutil.rmtree(shards_dir)
        logger.info(
            "generate (ray, %d workers): %d rows, %d rejects%s -> %s",
            workers,
            summary["rows"],
            summary["rejects"],
            describe_rejects(summary["reject_kinds"]),
            output,
        )
        return summary


def _committed(out: Path) -> int:
    """Input rows a shard has committed so far (its manifest; the final file once merged)."""
    if out.exists():  # finished: the parts were merged into the shard's output and rejects files
        rejects = rejects_path(out)
        return count_rows(out) + (count_rows(rejects) if rejects.exists() else 0)
    manifest = out.with_name(out.name + ".parts") / "manifest.json"
    try:
        chunks = json.loads(manifest.read_text())["chunks"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0
    return sum(c["rows"] + c["rejects"] for c in chunks)


def _wait_with_progress(
    ray: Any, refs: list[Any], outs: list[Path], *, total: int, progress: bool
) -> list[Any]:
    """ray.get with a progress bar fed by the shards' manifests (users/s and ETA over all workers)."""
    from tqdm.auto import tqdm

    pending = list(refs)
    with tqdm(total=total, desc="generate (ray)", unit="user", disable=not progress) as bar:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            done = sum(_committed(o) for o in outs)
            bar.update(max(0, done - bar.n))
        bar.update(total - bar.n)
    return list(ray.get(refs))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield int(json.loads(line)["line"]), line


def merge_shards(outs: list[Path], output: Path) -> None:
    """Merge shard outputs into one file: JSONL in input-line order (k-way merge), Parquet shard after
    shard; rejects in line order. Each file appears whole (atomic_file) or not at all."""
    if (
        output.suffix == ".parquet"
    ):  # streamed shard by shard (memory stays flat); the `line` column orders rows
        import pyarrow.parquet as pq

        with atomic_file(output, "wb") as out, pq.ParquetWriter(out, output_schema()) as writer:
            for o in outs:  # every shard wrote these columns
                if o.exists():
                    f = pq.ParquetFile(o)
                    for g in range(f.num_row_groups):
                        writer.write_table(f.read_row_group(g))
    else:
        with atomic_file(output, "w", encoding="utf-8") as out:
            for _, line in heapq.merge(*(_jsonl_rows(o) for o in outs if o.exists())):
                out.write(line if line.endswith("\n") else line + "\n")
    rejects = [rejects_path(o) for o in outs]
    with atomic_file(rejects_path(output), "w", encoding="utf-8") as out:
        for _, line in heapq.merge(*(_jsonl_rows(r) for r in rejects if r.exists())):
            out.write(line if line.endswith("\n") else line + "\n")
