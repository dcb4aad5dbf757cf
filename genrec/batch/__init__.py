"""Offline batch generation: stream users in, write ranked items out in chunks that survive a crash.

Input rows (JSONL, gzip-compressed or not, or Parquet, or a folder of such part files read as one input;
streamed, never loaded whole): `user` and/or `history` (item ids, ID strings or titles, oldest first), and/or
`text` (the user's need in words; alone: a new user).
Output: one row per accepted input row with the ranked items, the template hash and the model. Work is
committed chunk by chunk: each chunk's rows and rejects are written to `<output>.parts/` by temp file +
rename, then recorded in `manifest.json` (also atomic). `resume=True` skips committed chunks, so a job
killed at any point (even `kill -9`) ends with exactly one row per input row. One job per output at a time:
`<output>.lock` (flock) refuses a second job, resumed or not, naming the running one. Commits are fsynced
(file and folder); an output that cannot be written is a GenrecError naming it. Bad rows go to
`<output stem>.rejects.jsonl` with line, kind and reason; the summary counts them by kind.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from genrec.batch.input import Reject, Row, locator, parse_row, read_input, scan_input
from genrec.batch.manifest import Manifest, describe_rejects, reject_counts, rejects_path, writing
from genrec.config import RankingOptions
from genrec.errors import GenrecError, stopped_by
from genrec.recommender import PreparedBatch, RankRequest, Recommendation, Recommender
from genrec.run import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)


def _log_stopped(manifest: Manifest, parts: Path, error: BaseException) -> None:
    """Say what a stopped job kept and how to go on: the same command with --resume."""
    chunks = manifest.data["chunks"]
    kept = sum(c["rows"] + c["rejects"] for c in chunks)
    why = stopped_by(error)
    logger.warning(
        "generate %s: %d input rows done in %d committed chunk(s) (%s, up to input line %d); the same command "
        "with --resume goes on from there",
        why,
        kept,
        len(chunks),
        parts,
        manifest.last_line,
    )


def check_options(*, chunk_size: int = 1000, batch_size: int = 32, **_: Any) -> None:
    """A batch job's own options, checked before any input is read (named by their `genrec generate` flags);
    the ranking options are checked when their RankingOptions is made, `generate`'s other keywords pass."""
    for flag, value in (("--chunk-size", chunk_size), ("--batch-size", batch_size)):
        if value < 1:
            raise GenrecError(f"{flag} must be >= 1, got {value}")


def generate(
    rec: Recommender,
    input_path: str | Path,
    output_path: str | Path,
    *,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
    chunk_size: int = 1000,
    ranking: RankingOptions | None = None,
    batch_size: int = 32,
    progress: bool = True,
    workers: int = 0,
) -> dict[str, Any]:
    """Rank every input row of this shard; see the module docstring for the crash-safety contract.
    `ranking`: every row's options (None: the run's defaults, RunConfig.ranking). `workers` > 0 renders
    prompts and retrieves candidates in that many processes (genrec.prep) while this one ranks; the output is
    the same."""
    check_options(chunk_size=chunk_size, batch_size=batch_size)
    ranking = ranking or rec.cfg.ranking
    input_path, output = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise GenrecError(f"input {input_path} does not exist")
    if output.suffix not in (".jsonl", ".parquet"):
        raise GenrecError(f"--output {output}: use a .jsonl or .parquet file name")
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise GenrecError(f"--shard {k}/{n}: expected i/n with 0 <= i < n")
    with output_lock(output):  # before anything is read or written: one job per output
        parts = output.with_name(output.name + ".parts")
        if not resume and (parts.exists() or output.exists()):
            raise GenrecError(
                f"{output} or {parts} exists from an earlier run: pass --resume to continue, or remove them"
            )
        stamp, files = scan_input(input_path, progress=progress)
        with writing(parts):
            parts.mkdir(parents=True, exist_ok=True)
        pinned = rec.pin_template(None)
        if resume and (parts / "manifest.json").is_file():  # finish with the version the job started with
            started = json.loads((parts / "manifest.json").read_text())["settings"]
            pinned = rec.templates.version(
                started.get("template", pinned.name), started.get("template_version", 1)
            )
        settings = {
            "input": str(input_path.resolve()),
            **stamp,
            "shard": f"{k}/{n}",
            # `mode`: the name jobs started before RankingOptions recorded, so that they still resume
            "n_items": ranking.n_items,
            "mode": ranking.candidates,
            "n_candidates": ranking.n_candidates,
            "chunk_size": chunk_size,
            "template": pinned.name,
            "template_version": pinned.version,
            "template_hash": pinned.hash,
        }
        manifest = Manifest(parts, settings)
        model_id = str(rec.run.path.name)
        if not manifest.data["done"]:
            try:
                _run_chunks(
                    rec,
                    manifest,
                    input_path,
                    shard,
                    files=files,
                    chunk_size=chunk_size,
                    batch_size=batch_size,
                    progress=progress,
                    workers=workers,
                    row_fields={"template_hash": pinned.hash, "model": model_id},
                    options={
                        "ranking": ranking,
                        "template": pinned.name,
                        "template_version": pinned.version,
                        "need_template": rec.need_template,
                    },
                )
            except (
                BaseException
            ) as e:  # Ctrl-C (the CLI exits quietly on it), an engine error, an unreadable row
                _log_stopped(manifest, parts, e)
                raise
            with writing(output):
                _finalize(manifest, output)
        chunks = manifest.data["chunks"]
        summary = {
            "rows": sum(c["rows"] for c in chunks),
            "rejects": sum(c["rejects"] for c in chunks),
            "reject_kinds": reject_counts(chunks),
            "chunks": len(chunks),
            "output": str(output),
            "rejects_file": str(rejects_path(output)),
        }
        logger.info(
            "generate: %d rows, %d rejects%s -> %s",
            summary["rows"],
            summary["rejects"],
            describe_rejects(summary["reject_kinds"]),
            output,
        )
        return summary


def _run_chunks(
    rec: Recommender,
    manifest: Manifest,
    input_path: Path,
    shard: tuple[int, int],
    *,
    files: list[tuple[Path, int]],
    chunk_size: int,
    batch_size: int,
    progress: bool,
    row_fields: dict[str, Any],
    options: dict[str, Any],
    workers: int = 0,
) -> None:
    k, n = shard
    bar = tqdm(
        desc="generate",
        unit="user",
        total=len(range(k, sum(rows for _, rows in files), n)),  # this shard's rows: users/s and ETA
        disable=not progress,
        initial=sum(c["rows"] + c["rejects"] for c in manifest.data["chunks"]),
    )
    from genrec.prep import prepared_batches

    folder = input_path.is_dir()
    units = _units(_chunks(rec, manifest, files, folder, shard, chunk_size), batch_size, options)
    with (
        bar,
        prepared_batches(rec, units, workers) as prepared,
    ):  # the bar ends its line first if the job stops
        _rank_and_commit(rec, manifest, prepared, row_fields, bar)


@dataclass
class _Chunk:
    index: int
    pending: list[Row | Reject]
    last_line: int

    @property
    def rows(self) -> list[Row]:
        return [p for p in self.pending if isinstance(p, Row)]


def _chunks(
    rec: Recommender,
    manifest: Manifest,
    files: list[tuple[Path, int]],
    folder: bool,
    shard: tuple[int, int],
    chunk_size: int,
) -> Iterator[_Chunk]:
    """This shard's rows after the committed ones, parsed, in chunks of `chunk_size` (accepted + rejected).
    `folder`: the input is a folder of part files, and each reject names its part and line there."""
    k, n = shard
    skip = manifest.last_line
    index = len(manifest.data["chunks"])
    pending: list[Row | Reject] = []
    last_read = skip
    where = locator(files) if folder else None
    for line, obj, raw in read_input(files, keep=lambda line: (line - 1) % n == k, start=skip + 1):
        row = parse_row(rec, line, obj, raw)
        if where is not None and isinstance(row, Reject):
            row.source = where(line)
        pending.append(row)
        last_read = line
        if len(pending) >= chunk_size:
            yield _Chunk(index, pending, last_read)
            index, pending = index + 1, []
    if pending:
        yield _Chunk(index, pending, last_read)


def _batches(chunk: _Chunk, batch_size: int, options: dict[str, Any]) -> list[list[RankRequest]]:
    rows = chunk.rows
    return [
        [
            RankRequest(
                r.history,
                options["ranking"],
                user=r.user,
                # a row with text renders with the need template (its active version), the rest with the pinned one
                template=options["need_template"] if r.query else options["template"],
                template_version=None if r.query else options["template_version"],
                query=r.query,
            )
            for r in rows[s : s + batch_size]
        ]
        for s in range(0, len(rows), batch_size)
    ]


def _units(
    chunks: Iterator[_Chunk], batch_size: int, options: dict[str, Any]
) -> Iterator[tuple[tuple[_Chunk, bool], list[RankRequest]]]:
    """Every chunk's batches tagged (chunk, is its last batch); a chunk of rejects only gives one empty batch."""
    for chunk in chunks:
        batches = _batches(chunk, batch_size, options) or [[]]
        for i, reqs in enumerate(batches):
            yield (chunk, i == len(batches) - 1), reqs


def _rank_and_commit(
    rec: Recommender,
    manifest: Manifest,
    prepared: Iterator[tuple[tuple[_Chunk, bool], list[RankRequest], PreparedBatch]],
    row_fields: dict[str, Any],
    bar: Any,
) -> None:
    """Rank prepared batches in order (one launched ahead: Recommender.rank_stream); commit each chunk once
    its last batch is ranked."""
    done: list[list[list[Recommendation]]] = []
    for (chunk, last), reqs, ranked in rec.rank_stream(prepared):
        done.append(ranked)
        bar.update(len(reqs))
        if last:
            _commit(manifest, chunk, done, row_fields, bar)
            done = []


def _commit(
    manifest: Manifest,
    chunk: _Chunk,
    ranked: list[list[list[Recommendation]]],
    row_fields: dict[str, Any],
    bar: Any,
) -> None:
    """Commit a chunk's rows (its batches' recommendations, in order) and rejects: one manifest entry."""
    rows = iter(chunk.rows)
    out: list[dict[str, Any]] = []
    for recs in itertools.chain.from_iterable(ranked):
        r = next(rows)
        items = [
            {"rank": i + 1, "item_id": x.item_id, "title": x.title, "score": round(x.score, 6)}
            for i, x in enumerate(recs)
        ]
        out.append({"line": r.line, "user": r.user, "items": items, **row_fields})
    rejects = [p for p in chunk.pending if isinstance(p, Reject)]
    manifest.commit(chunk.index, out, rejects, chunk.last_line)
    bar.update(len(rejects))


def output_schema() -> Any:
    """The Parquet output's columns, fixed: a chunk (or a shard) whose users are all missing must not make
    `user` a null column that the next chunk's names cannot be written to."""
    import pyarrow as pa

    item = pa.struct(
        [("rank", pa.int64()), ("item_id", pa.string()), ("title", pa.string()), ("score", pa.float64())]
    )
    return pa.schema(
        [
            ("line", pa.int64()),
            ("user", pa.string()),
            ("items", pa.list_(item)),
            ("template_hash", pa.string()),
            ("model", pa.string()),
        ]
    )


def _finalize(manifest: Manifest, output: Path) -> None:
    """Concatenate committed parts (streamed) into the output and the rejects file, then drop the parts."""
    parts = [manifest.folder / f"part-{c['index']:06d}" for c in manifest.data["chunks"]]
    if output.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = output_schema()
        with atomic_file(output, "wb") as f, pq.ParquetWriter(f, schema) as writer:
            for p in parts:  # no rows: an empty file with the same columns
                rows = [json.loads(x) for x in p.with_suffix(".jsonl").read_text().splitlines()]
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    else:
        with atomic_file(output, "w") as out:
            for p in parts:
                with open(p.with_suffix(".jsonl")) as f:
                    shutil.copyfileobj(f, out)
    with atomic_file(rejects_path(output), "w") as out:
        for p in parts:
            with open(p.with_suffix(".rejects.jsonl")) as f:
                shutil.copyfileobj(f, out)
    manifest.data["done"] = True
    atomic_write_text(manifest.path, json.dumps(manifest.data, indent=1))
    for p in parts:
        p.with_suffix(".jsonl").unlink(missing_ok=True)
        p.with_suffix(".rejects.jsonl").unlink(missing_ok=True)


def lock_path(output: Path) -> Path:
    """The lock file of a job writing `output`: `<output>.lock`, beside `<output>.parts`."""
    return output.with_name(output.name + ".lock")


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `output` for this job: one job at a time per output, resumed or not. A second one is refused
    at once, naming the running job (its pid and start time, which the holder writes into the lock file).
    The lock is the kernel's (flock): it goes with the process, so a killed job never leaves a stale one."""
    path = lock_path(output)
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "another process"
            raise GenrecError(
                f"{output} is being written by another genrec job ({holder}; lock {path}): wait for it to "
                "finish, or stop it and pass --resume to go on from its committed chunks"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}, started {datetime.now(UTC).isoformat(timespec='seconds')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
