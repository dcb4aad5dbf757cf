"""Offline batch generation: stream users in, write ranked items out in chunks that survive a crash.

Input rows (JSONL, gzip-compressed or not, or Parquet, or a folder of such part files read as one input;
streamed, never loaded whole): `user` and/or `history` (item ids, ID strings or titles, oldest first).
Output: one row per accepted input row with the ranked items, the template hash and the model. Work is
committed chunk by chunk: each chunk's rows and rejects are written to `<output>.parts/` by temp file +
rename, then recorded in `manifest.json` (also atomic). `resume=True` skips committed chunks, so a job
killed at any point (even `kill -9`) ends with exactly one row per input row. One job per output at a time:
`<output>.lock` (flock) refuses a second job, resumed or not, naming the running one. Commits are fsynced
(file and folder); an output that cannot be written is a GenrecError naming it. Bad rows go to
`<output stem>.rejects.jsonl` with line, kind and reason; the summary counts them by kind.
"""

from __future__ import annotations

import bisect
import collections
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from genrec.data.loaders import (
    BAD_LINE_KINDS,
    GZIP_ERRORS,
    BadLine,
    data_suffix,
    extension,
    is_gzip,
    iter_jsonl,
    open_parquet,
    unreadable,
)
from genrec.errors import GenrecError, stopped_by
from genrec.recommender import PreparedBatch, RankRequest, Recommendation, Recommender, UnknownItems
from genrec.run import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class Row:
    line: int
    user: str | None
    history: list[int]
    query: str | None = None
    """The row's free text (`text`): the user's request, ranked with the history (or alone)."""


@dataclass
class Reject:
    line: int
    reason: str
    raw: str
    kind: str
    """What is wrong, in a few words (one of REJECT_KINDS): the end-of-job counts group rejects by it."""
    source: str = ""
    """For a folder input: the part file and the row's line in it."""


REJECT_KINDS = (
    *BAD_LINE_KINDS,
    "no user or history",
    "unknown user",
    "history not a list",
    "unknown items",
    "empty history",
    "text not a string",
)
"""A reject's `kind`: a line that is not a row (BAD_LINE_KINDS), or a row that cannot be ranked."""


INPUT_FIELDS = ("user", "user_id", "history", "text")
"""The fields of an input row a batch job reads (a Parquet input's other columns are not read)."""


def input_columns(parquet: Any, path: Path) -> list[str]:
    """The INPUT_FIELDS columns of a Parquet input (a pyarrow ParquetFile); an error naming the columns it has
    when it has none of them."""
    names = parquet.schema_arrow.names
    columns = [c for c in INPUT_FIELDS if c in names]
    if not columns:
        raise GenrecError(
            f"{path}: no column {', '.join(map(repr, INPUT_FIELDS))} (it has {', '.join(names[:20])}"
            f"{', ...' if len(names) > 20 else ''}): rows need a user id, a history or a text"
        )
    return columns


_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


def _format_of(path: Path) -> str | None:
    """`parquet` or `jsonl` by the file's extension (JSON Lines maybe gzip-compressed: `.jsonl.gz`, `.json.gz`);
    None for anything else, a gzipped Parquet file included (Parquet compresses inside)."""
    fmt = _FORMATS.get(data_suffix(path))
    return None if fmt == "parquet" and is_gzip(path) else fmt


def _format(path: Path) -> str:
    """`_format_of`, or an error naming the file."""
    if (fmt := _format_of(path)) is None:
        raise GenrecError(f"{path}: input must be .jsonl (or .jsonl.gz) or .parquet")
    return fmt


def input_files(path: Path) -> list[Path]:
    """The files of an input: the file itself, or a folder's part files in name order (a Spark or Hive export:
    every file is *.parquet, or every one *.jsonl / *.json, gzipped or not; names starting with '.' or '_' are
    not data)."""
    if path.is_file():
        _format(path)
        return [path]
    if not path.is_dir():
        raise GenrecError(f"input {path} does not exist")
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith((".", "_")))
    if len({_format_of(f) for f in files}) != 1 or _format_of(files[0]) is None:
        found = ", ".join(sorted({extension(f) or f.name for f in files})) or "no data file"
        raise GenrecError(
            f"{path}: a folder input holds part files of one format, all *.parquet or all *.jsonl (found: {found})"
        )
    return files


def read_input(
    parts: list[tuple[Path, int]], keep: Callable[[int], bool] | None = None, *, start: int = 1
) -> Iterator[tuple[int, dict[str, Any] | None, BadLine | None]]:
    """`read_rows` of an input's files (`scan_input`'s parts: each file and its rows), whose lines count across
    them in order; files wholly before `start` are not opened."""
    offset = 0
    for f, n in parts:
        if offset + n >= start:
            for line, obj, problem in read_rows(f, _shifted(keep, offset), start=max(1, start - offset)):
                yield line + offset, obj, problem
        offset += n


def _shifted(keep: Callable[[int], bool] | None, offset: int) -> Callable[[int], bool] | None:
    """`keep` of a file's own line numbers, for a file whose first line is input line offset + 1."""
    return None if keep is None else lambda line: keep(line + offset)


def locator(parts: list[tuple[Path, int]]) -> Callable[[int], str]:
    """Where input line `line` is among the input's files: "<file name> line <n>"."""
    names, ends = [f.name for f, _ in parts], list(itertools.accumulate(n for _, n in parts))

    def where(line: int) -> str:
        i = bisect.bisect_left(ends, line)
        return f"{names[i]} line {line - (ends[i - 1] if i else 0)}"

    return where


def read_rows(
    path: Path, keep: Callable[[int], bool] | None = None, *, start: int = 1
) -> Iterator[tuple[int, dict[str, Any] | None, BadLine | None]]:
    """(line, parsed row, None) or (line, None, what is wrong: a BadLine), streamed; a Parquet row's line is its 1-based
    row number. Rows whose line `keep` rejects are not parsed (JSONL) or not converted (Parquet): a shard
    reads 1/n of the rows. Rows before line `start` are not given (a resumed job's committed rows): JSONL
    lines read as bytes only, Parquet row groups not read at all. Of a Parquet input, only INPUT_FIELDS'
    columns are read; one with none of them is an error naming the columns it has."""
    if _format(path) == "parquet":
        import pyarrow as pa

        f = open_parquet(path)
        columns = input_columns(f, path)
        sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
        ends = list(itertools.accumulate(sizes))
        first = next(
            (g for g, end in enumerate(ends) if end >= start), len(sizes)
        )  # the group holding `start`
        line = ends[first - 1] if first else 0
        try:
            for batch in f.iter_batches(
                batch_size=4096, row_groups=range(first, len(sizes)), columns=columns
            ):
                lines = range(line + 1, line + 1 + batch.num_rows)
                wanted = [i for i in lines if i >= start and (keep is None or keep(i))]
                if len(wanted) < batch.num_rows:
                    batch = batch.take(pa.array([i - lines.start for i in wanted], type=pa.int64()))
                if wanted:
                    yield from zip(wanted, batch.to_pylist(), itertools.repeat(None))
                line = lines.stop - 1
        except (pa.ArrowException, OSError) as e:  # committed chunks stay: --resume once the file is mended
            raise GenrecError(f"{path}: unreadable after row {line} ({e})") from None
        return
    yield from iter_jsonl(path, keep if start <= 1 else lambda i: i >= start and (keep is None or keep(i)))


def count_rows(path: Path) -> int:
    """Rows in one file (an input part, an output, a rejects file) without parsing it: parquet metadata, or
    newlines read in 1 MiB blocks."""
    return _scan_file(path)


def parse_row(
    rec: Recommender, line: int, obj: dict[str, Any] | None, problem: BadLine | None
) -> Row | Reject:
    if problem is not None:
        return Reject(line, problem.reason, "", problem.kind)
    assert obj is not None  # read_rows gives a row or what is wrong with the line
    parsed = _parse(rec, line, obj)
    if isinstance(parsed, Row):
        return parsed
    kind, reason = parsed
    return Reject(line, reason, json.dumps(obj, default=str)[:200], kind)  # a Parquet row may hold dates


def _parse(rec: Recommender, line: int, obj: dict[str, Any]) -> Row | tuple[str, str]:
    """The row, or (kind, why) it cannot be ranked."""
    user = obj.get("user", obj.get("user_id"))
    user = str(user) if user is not None else None
    hist = obj.get("history")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        return "text not a string", "field 'text': expected a string"
    query = text.strip() if text and text.strip() else None
    if hist is None and user is None and query is not None:  # a new user's request in words alone
        return Row(line, None, [], query)
    if hist is not None:
        if isinstance(hist, str):
            hist = [h for h in hist.split(",") if h.strip()]
        if not isinstance(hist, list):
            return "history not a list", "field 'history': expected a list of items"
        try:
            items = rec.resolve_items([str(h) for h in hist])
        except UnknownItems as e:
            return "unknown items", f"field 'history': {e}"
    elif user is not None and rec.knows_user(user):
        items = rec.user_history(user, split="full")
    elif user is not None:
        return "unknown user", f"field 'user': unknown user {user!r} and no history"
    else:
        return "no user or history", "neither 'user' nor 'history' given"
    if not items and query is None:
        return "empty history", "field 'history': empty"
    return Row(line, user, items, query)


INPUT_STAMP = ("input_size", "input_sha256")
"""What a manifest records of the input file, so that a resumed job refuses an input that changed."""
_OLD_STAMPS = ("input_ends_sha256",)
"""Stamps of earlier versions (a hash of the first and last MiB only), dropped when such a job resumes."""


def scan_input(
    path: Path, *, digest: bool = True, progress: bool = False
) -> tuple[dict[str, Any], list[tuple[Path, int]]]:
    """The input's stamp (size, sha256 of every byte) and its files with their row counts, in one read in 1 MiB
    blocks; checked on the way (`input_files`, and a Parquet file's columns: `input_columns`).

    Rows: Parquet metadata, or JSONL lines (a last line without a newline counts; a .gz file's lines as it
    decompresses, its bytes hashed as stored). The hash runs at about
    1 GB/s on one core (a few seconds per million rows at most), and changes with any edit anywhere; the
    same content written again (restored from a copy, touched) keeps it. A folder input: its parts' names and
    bytes, in order, so a renamed, added or removed part changes it too. A bar shows inputs over 1 GiB."""
    files = input_files(path)
    sha, sizes, folder = hashlib.sha256(), [f.stat().st_size for f in files], path.is_dir()
    parts = []
    with tqdm(
        total=sum(sizes),
        desc="scan input",
        unit="B",
        unit_scale=True,
        disable=not progress or sum(sizes) < 1 << 30,
    ) as bar:
        for f in files:
            if folder:
                sha.update(f"{f.name}\n".encode())
            parts.append((f, _scan_file(f, sha if digest else None, check=True, bar=bar)))
    return {"input_size": sum(sizes), "input_sha256": sha.hexdigest() if digest else ""}, parts


class _Tap:
    """A binary file whose bytes, as they are read, go to a hash and a progress bar (either may be None)."""

    def __init__(self, f: Any, sha: Any, bar: Any) -> None:
        self.f, self.sha, self.bar = f, sha, bar

    def read(self, size: int = -1) -> bytes:
        block = self.f.read(size)
        if self.sha is not None:
            self.sha.update(block)
        if self.bar is not None:
            self.bar.update(len(block))
        return block

    def seek(self, offset: int, /) -> int:
        raise io.UnsupportedOperation("a scan reads its file once, in order")


def _scan_file(path: Path, sha: Any = None, *, check: bool = False, bar: Any = None) -> int:
    """One file's rows, its bytes (as stored) fed to `sha` (when given) on the way; `check`: a Parquet file's
    columns too. A .gz file's lines are counted as it decompresses; damaged gzip data is an error naming it."""
    lines, last = 0, b"\n"
    parquet = _format(path) == "parquet"
    if sha is not None or not parquet:
        with open(path, "rb") as f:
            tap = _Tap(f, sha, bar)
            data = gzip.GzipFile(fileobj=tap, mode="rb") if is_gzip(path) else tap
            try:
                while block := data.read(1 << 20):
                    if not parquet:
                        lines += block.count(b"\n")
                        last = block[-1:]
            except GZIP_ERRORS as e:
                raise unreadable(path, e, lines) from None
            while tap.read(1 << 20):  # bytes after the last gzip member, if any: hashed too
                pass
    if not parquet:
        return lines + (last != b"\n")
    f = open_parquet(path)
    if check:
        input_columns(f, path)
    return int(f.metadata.num_rows)


class Manifest:
    """Committed chunks, in input order; the resume point is the last committed input line."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder, self.path = folder, folder / "manifest.json"
        self.data: dict[str, Any] = {"settings": settings, "chunks": [], "done": False}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            started = self.data["settings"]
            for k in _OLD_STAMPS:
                started.pop(k, None)
            if any(started.get(k, settings[k]) != settings[k] for k in INPUT_STAMP):
                then, now = started.get("input_size", settings["input_size"]), settings["input_size"]
                how = (
                    f"{then:,} bytes then, {now:,} now"
                    if then != now
                    else f"same size ({now:,} bytes), other content"
                )
                raise GenrecError(
                    f"{settings['input']} changed since this job started ({how}): the committed chunks name its "
                    f"lines, so a resumed job must read the same file. Restore it, or remove {folder} (and the "
                    "output, if the job had finished) and start again"
                )
            started.update({k: settings[k] for k in INPUT_STAMP if k not in started})  # older manifests
            if started != settings:
                raise GenrecError(
                    f"{self.path}: written with other settings {self.data['settings']}; "
                    "remove the folder or rerun with the same options"
                )

    @property
    def last_line(self) -> int:
        return int(self.data["chunks"][-1]["last_line"]) if self.data["chunks"] else 0

    def commit(self, index: int, rows: list[dict[str, Any]], rejects: list[Reject], last_line: int) -> None:
        with writing(self.folder):
            self._commit(index, rows, rejects, last_line)

    def _commit(self, index: int, rows: list[dict[str, Any]], rejects: list[Reject], last_line: int) -> None:
        base = self.folder / f"part-{index:06d}"
        atomic_write_text(base.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(
            base.with_suffix(".rejects.jsonl"),
            "".join(json.dumps(_reject_record(r)) + "\n" for r in rejects),
        )
        kinds = collections.Counter(r.kind for r in rejects)
        self.data["chunks"].append(
            {
                "index": index,
                "last_line": last_line,
                "rows": len(rows),
                "rejects": len(rejects),
                "reject_kinds": dict(kinds),
            }
        )
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def _reject_record(r: Reject) -> dict[str, Any]:
    where = {"source": r.source} if r.source else {}
    return {"line": r.line, **where, "kind": r.kind, "reason": r.reason, "raw": r.raw}


def reject_counts(chunks: list[dict[str, Any]]) -> dict[str, int]:
    """Rejects by kind over a manifest's chunks, most first; those of chunks committed by a genrec from
    before kinds were recorded count as `not recorded`."""
    counts: collections.Counter[str] = collections.Counter()
    for c in chunks:
        kinds = c.get("reject_kinds", {"not recorded": c["rejects"]} if c["rejects"] else {})
        counts.update(kinds)
    return dict(counts.most_common())


def describe_rejects(counts: dict[str, int]) -> str:
    """`(12 unknown user, 3 malformed JSON)`, or "" when there are none."""
    return f" ({', '.join(f'{n:,} {kind}' for kind, n in counts.items())})" if counts else ""


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


def check_options(
    *,
    n_items: int = 10,
    mode: str = "all",
    n_candidates: int = 200,
    chunk_size: int = 1000,
    batch_size: int = 32,
    **_: Any,
) -> None:
    """A batch job's options, checked before any input is read (named by their `genrec generate` flags);
    `generate`'s other keywords pass unchecked."""
    if mode not in ("all", "retriever"):
        raise GenrecError(f"--candidates must be 'all' or 'retriever', got {mode!r}")
    for flag, value in (
        ("-n", n_items),
        ("--n-candidates", n_candidates),
        ("--chunk-size", chunk_size),
        ("--batch-size", batch_size),
    ):
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
    n_items: int = 10,
    mode: str = "all",
    n_candidates: int = 200,
    batch_size: int = 32,
    progress: bool = True,
    workers: int = 0,
) -> dict[str, Any]:
    """Rank every input row of this shard; see the module docstring for the crash-safety contract.
    `workers` > 0 renders prompts and retrieves candidates in that many processes (genrec.prep)
    while this one ranks; the output is the same."""
    check_options(
        n_items=n_items, mode=mode, n_candidates=n_candidates, chunk_size=chunk_size, batch_size=batch_size
    )
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
            "n_items": n_items,
            "mode": mode,
            "n_candidates": n_candidates,
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
                        "n_items": n_items,
                        "mode": mode,
                        "n_candidates": n_candidates,
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
                n_items=options["n_items"],
                mode=options["mode"],
                n_candidates=options["n_candidates"],
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


def rejects_path(output: Path) -> Path:
    """Where the rejects of a job writing `output` go: `<output stem>.rejects.jsonl` beside it."""
    return output.with_name(output.stem + ".rejects.jsonl")


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


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An output that cannot be written (read-only folder, full disk, missing parent) is a GenrecError
    naming the file, not an OSError traceback; committed chunks stay for --resume."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (BlockingIOError, InterruptedError)):
            raise
        where = e.filename or path
        raise GenrecError(
            f"cannot write {where}: {e.strerror or e}; chunks committed before this stay, "
            "so the same command with --resume goes on once it can write there"
        ) from e
