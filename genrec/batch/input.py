"""A batch job's input: the files (JSONL, gzip or not, Parquet, a folder of parts), streaming rows with
their line numbers, parsing a row into a user's history or a reject, and the input's stamp (size and
hash) that a resumed job checks. Knows nothing of chunks, manifests or ranking.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from genrec.errors import GenrecError
from genrec.recommender import QueryProblem, Recommender


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


INPUT_FIELDS = ("user", "user_id", "history", "text")


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
    """The row, or (kind, why) it cannot be ranked (Recommender.resolve_query, as every front end; a row's
    user beside its history only labels the output)."""
    user = obj.get("user", obj.get("user_id"))
    user = str(user) if user is not None else None
    try:
        q = rec.resolve_query(user=user, history=obj.get("history"), text=obj.get("text"), strict_user=False)
    except QueryProblem as e:
        return e.code.replace("_", " "), str(e)
    return Row(line, user, q.history, q.text)


INPUT_STAMP = ("input_size", "input_sha256")


_OLD_STAMPS = ("input_ends_sha256",)


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
