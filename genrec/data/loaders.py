"""Readers for interaction logs and catalogues. Each returns a raw (catalog, users, sequences).

Formats: MovieLens 100K/1M, one-line-per-user sequences (`user item1 item2 ...`), UniSRec
(`X.text` + `X.*.inter`), and generic CSV / JSONL / Parquet tables with a column mapping. Text files (CSV,
JSONL, sequences) may be gzip-compressed (`*.gz`, read as they decompress).
Every malformed row raises a DataError naming the file, the line and the field. Cleaning
(k-core, dedupe) happens later in `catalog.clean`; this module only parses.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pandas as pd

from genrec.data.catalog import Catalog
from genrec.errors import DataError

logger = logging.getLogger(__name__)

Raw = tuple[Catalog, list[str], list[list[int]]]

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def _need_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError("file not found", path=path)
    return path


def _group(
    rows: Iterable[tuple[str, int, float, int]],
) -> tuple[list[str], list[list[int]]]:
    """(user, item_row, time, line) -> users and item sequences sorted by (time, line)."""
    per_user: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for user, item, time, line in rows:
        per_user[user].append((time, line, item))
    users = list(per_user)
    return users, [[item for _, _, item in sorted(per_user[u])] for u in users]


def load_movielens(folder: str | Path, *, min_rating: float | None = None) -> Raw:
    """MovieLens 100K (`u.data`, `u.item`) or 1M (`ratings.dat`, `movies.dat`) folder."""
    folder = Path(folder)
    if (folder / "u.data").is_file():
        items_path, ratings_path, sep, ml1m = folder / "u.item", folder / "u.data", "\t", False
    elif (folder / "ratings.dat").is_file():
        items_path, ratings_path, sep, ml1m = folder / "movies.dat", folder / "ratings.dat", "::", True
    else:
        raise DataError("not a MovieLens folder (expected u.data or ratings.dat)", path=folder)
    ids, titles, texts, attrs = [], [], [], []
    with open(_need_file(items_path), encoding="latin-1") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("::" if ml1m else "|")
            if ml1m:
                if len(parts) != 3:
                    raise DataError(f"expected 3 fields, got {len(parts)}", path=items_path, line=line_no)
                genres = parts[2].split("|")
            else:
                if len(parts) != 24:
                    raise DataError(f"expected 24 fields, got {len(parts)}", path=items_path, line=line_no)
                genres = [g for g, flag in zip(ML100K_GENRES, parts[5:], strict=True) if flag == "1"]
            ids.append(parts[0])
            titles.append(parts[1])
            texts.append(f"{parts[1]}. Genres: {', '.join(genres)}.")
            attrs.append({"genres": "|".join(genres)})
    catalog = Catalog(ids, titles, texts, attrs, source=str(items_path))

    def rows() -> Iterable[tuple[str, int, float, int]]:
        with open(_need_file(ratings_path), encoding="latin-1") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split(sep)
                if len(parts) != 4:
                    raise DataError(f"expected 4 fields, got {len(parts)}", path=ratings_path, line=line_no)
                user, item, rating, ts = parts
                if item not in catalog.index:
                    raise DataError(
                        f"unknown item {item!r} (not in {items_path.name})",
                        path=ratings_path,
                        line=line_no,
                        field="item_id",
                    )
                try:
                    r, t = float(rating), float(ts)
                except ValueError:
                    raise DataError(
                        f"rating/timestamp not numeric: {rating!r}, {ts!r}",
                        path=ratings_path,
                        line=line_no,
                        field="rating" if not _is_float(rating) else "timestamp",
                    ) from None
                if min_rating is None or r >= min_rating:
                    yield user, catalog.index[item], t, line_no

    users, seqs = _group(rows())
    return catalog, users, seqs


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
"""What reading a damaged .gz file raises: cut short, not gzip, corrupt inside."""


def data_suffix(path: Path) -> str:
    """A data file's format extension, lower case, under a `.gz` compression extension (`users.jsonl.gz` and
    `users.JSONL` -> `.jsonl`)."""
    return (path.with_suffix("") if is_gzip(path) else path).suffix.lower()


def is_gzip(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def extension(path: Path) -> str:
    """`data_suffix` with the compression's: `.jsonl.gz`, `.csv`; for messages."""
    return data_suffix(path) + (".gz" if is_gzip(path) else "")


def open_binary(path: Path) -> BinaryIO:
    """A data file's bytes; a `.gz` file's as they decompress (every gzip member, as `cat a.gz b.gz` makes)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")  # type: ignore[return-value]


def unreadable(path: Path, error: BaseException, after: int | None = None) -> DataError:
    """The error for a .gz file that cannot be read (on past line `after`, when known)."""
    what = "ends early (cut short?)" if isinstance(error, EOFError) else f"is damaged ({error})"
    return DataError(f"gzip data {what}{'' if after is None else f' after line {after:,}'}", path=path)


def decoded_lines(
    path: Path, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text without its line end, "") per line of a UTF-8 file, or (line number, None, what is
    wrong) for a line that is not UTF-8; each line decoded alone, so one bad byte spoils one line. A
    byte-order mark and CRLF line ends are fine. `keep(line number)` false: the line is passed over
    undecoded (a shard's other rows, the rows a resumed job already did). A `.gz` file is read as it
    decompresses; damaged gzip data is a DataError naming the file and the last line read."""
    line_no = 0
    with open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                if keep is not None and not keep(line_no):
                    continue
                try:
                    yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n"), ""
                except UnicodeDecodeError as e:
                    text = raw.decode("utf-8", "replace").strip()[:80]
                    yield (
                        line_no,
                        None,
                        f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}): {text!r}",
                    )
        except GZIP_ERRORS as e:
            raise unreadable(path, e, line_no) from None


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """`decoded_lines` of a data file, where a line that is not UTF-8 is a DataError naming it."""
    for line_no, text, problem in decoded_lines(path):
        if text is None:
            raise DataError(problem, path=path, line=line_no)
        yield line_no, text


def open_parquet(path: Path) -> Any:
    """A Parquet file opened for streaming (pyarrow.parquet.ParquetFile); a DataError naming the file when it
    is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", path=path) from None


def _tsv(path: Path, n_fields: int, *, header: str | None = None) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file, skipping a header line that starts with `header`."""
    for line_no, line in _utf8_lines(_need_file(path)):
        if (line_no == 1 and header and line.startswith(header)) or not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != n_fields:
            raise DataError(
                f"expected {n_fields} tab-separated fields, got {len(parts)}", path=path, line=line_no
            )
        yield line_no, parts


def load_sequences(path: str | Path) -> Raw:
    """One line per user, `user item1 item2 ...` in time order; ids only (no item text)."""
    path = _need_file(Path(path))
    item_index: dict[str, int] = {}
    users, seqs = [], []
    seen_users: dict[str, int] = {}
    for line_no, line in _utf8_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError("a user with no items", path=path, line=line_no, field="items")
        if parts[0] in seen_users:
            raise DataError(
                f"user {parts[0]!r} already listed on line {seen_users[parts[0]]}",
                path=path,
                line=line_no,
                field="user",
            )
        seen_users[parts[0]] = line_no
        users.append(parts[0])
        seqs.append([item_index.setdefault(i, len(item_index)) for i in parts[1:]])
    ids = list(item_index)
    return Catalog(ids, [""] * len(ids), [""] * len(ids), source=str(path)), users, seqs


def load_unisrec(folder: str | Path) -> Raw:
    """UniSRec downstream folder: `X.text`, `X.item2index`, `X.test.inter` (full sequences)."""
    folder = Path(folder)
    texts_found = sorted(folder.glob("*.text"))
    if not texts_found:
        raise DataError("no *.text file (UniSRec format)", path=folder)
    stem = texts_found[0].name[: -len(".text")]
    text_path, map_path, inter_path = (
        texts_found[0],
        folder / f"{stem}.item2index",
        folder / f"{stem}.test.inter",
    )
    texts = {parts[0]: parts[1].strip() for _, parts in _tsv(text_path, 2, header="item_id:")}
    index_to_asin = {parts[1]: parts[0] for _, parts in _tsv(map_path, 2)}
    ids = list(index_to_asin.values())
    full = [texts.get(a, "") for a in ids]
    titles = [t.split(". ")[0] for t in full]
    catalog = Catalog(ids, titles, full, [_unisrec_attributes(t) for t in full], source=str(text_path))
    users, seqs = [], []
    for line_no, parts in _tsv(inter_path, 3, header="user_id:"):
        seq = []
        for idx in [*parts[1].split(), parts[2]]:
            if idx not in index_to_asin:
                raise DataError(f"unknown item index {idx!r}", path=inter_path, line=line_no, field="item_id")
            seq.append(catalog.index[index_to_asin[idx]])
        users.append(parts[0])
        seqs.append(seq)
    return catalog, users, seqs


def _unisrec_attributes(text: str) -> dict[str, str]:
    """Category and brand from a UniSRec Amazon text (`title. categories. brand.`); none when it has fewer parts."""
    parts = [p.strip() for p in text.strip().rstrip(".").rsplit(". ", 2)]
    if len(parts) < 3 or not all(parts):
        return {}
    return {"category": parts[1], "brand": parts[2]}


class BadLine(NamedTuple):
    """A line of a JSON Lines file that is not a row: its kind (one of BAD_LINE_KINDS) and what is wrong."""

    kind: str
    reason: str


BAD_LINE_KINDS = ("not UTF-8", "malformed JSON", "not a JSON object")


def iter_jsonl(
    path: Path, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, dict[str, Any] | None, BadLine | None]]:
    """(line, object, None) per non-empty line, or (line, None, BadLine) for a bad one; streamed. Lines are
    decoded one by one, so a line that is not UTF-8 is one bad line, not the end of the file. Lines whose
    number `keep` rejects are neither decoded nor parsed."""
    for line_no, line, problem in decoded_lines(path, keep):
        if line is None:
            yield line_no, None, BadLine("not UTF-8", problem)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, None, BadLine("malformed JSON", f"malformed JSON ({e.msg}): {line.strip()[:80]!r}")
            continue
        if isinstance(row, dict):
            yield line_no, row, None
        else:
            yield line_no, None, BadLine("not a JSON object", "expected a JSON object")


def read_table(path: str | Path) -> pd.DataFrame:
    """CSV, JSONL or Parquet by extension, CSV and JSONL maybe gzip-compressed (`.csv.gz`); JSONL errors name
    the line."""
    path = _need_file(Path(path))
    suffix = data_suffix(path)
    if suffix == ".parquet" and not is_gzip(path):
        return open_parquet(path).read().to_pandas()
    if suffix == ".csv":
        try:
            with open_binary(path) as f:
                return pd.read_csv(f, dtype=str, keep_default_na=False)
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text (byte offset {e.start})", path=path) from None
        except pd.errors.ParserError as e:
            raise DataError(f"malformed CSV ({e})", path=path) from None
        except GZIP_ERRORS as e:
            raise unreadable(path, e) from None
    if suffix in (".jsonl", ".json"):
        rows = []
        for line_no, row, problem in iter_jsonl(path):
            if problem is not None:
                raise DataError(problem.reason, path=path, line=line_no)
            rows.append(row)
        return pd.DataFrame(rows)
    raise DataError(
        f"unsupported extension {extension(path)!r} (use .csv, .jsonl or .parquet; "
        ".csv.gz and .jsonl.gz for gzip-compressed text; Parquet compresses inside)",
        path=path,
    )


def _parse_times(raw: pd.Series) -> pd.Series:
    """Numbers (unix time) or dates, whichever most rows are; rows that fit neither become NaN."""
    num = pd.to_numeric(raw, errors="coerce")
    if num.notna().mean() >= 0.5:
        return num.astype(float)
    dt = pd.to_datetime(raw.astype(str), errors="coerce", utc=True, format="mixed")
    return pd.Series(np.where(dt.notna(), dt.astype("int64") / 1e9, np.nan), index=raw.index)


def _line(path: Path, row: int) -> int:
    """File line of a 0-based table row (CSV has a header line; JSONL/Parquet count rows from 1)."""
    return row + (2 if data_suffix(path) == ".csv" else 1)


def _column(df: pd.DataFrame, col: str, path: Path, flag: str) -> pd.Series:
    if col not in df.columns:
        raise DataError(
            f"missing column {col!r} (set {flag}); columns: {list(df.columns)}", path=path, field=col
        )
    return df[col]


def load_table(
    path: str | Path,
    *,
    items_path: str | Path | None,
    user_col: str,
    item_col: str,
    time_col: str | None,
    text_cols: list[str],
) -> Raw:
    """Interaction table (user, item[, time]) plus an optional item table (item, text columns)."""
    path = Path(path)
    df = read_table(path)
    users_s = _column(df, user_col, path, "data.user_col").astype(str)
    items_s = _column(df, item_col, path, "data.item_col").astype(str)
    if time_col:
        raw_t = _column(df, time_col, path, "data.time_col")
        times = _parse_times(raw_t)
        bad = times.isna().to_numpy().nonzero()[0]
        if len(bad):
            raise DataError(
                f"unparseable time {raw_t.iloc[bad[0]]!r}",
                path=path,
                line=_line(path, int(bad[0])),
                field=time_col,
            )
        time_vals = times.astype(float).tolist()
    else:
        time_vals = [0.0] * len(df)
    for name, s in ((user_col, users_s), (item_col, items_s)):
        empty = (s.str.strip() == "") | df[name].isna()
        if empty.any():
            raise DataError(
                "empty value", path=path, line=_line(path, int(empty.to_numpy().nonzero()[0][0])), field=name
            )
    if items_path is not None:
        ipath = Path(items_path)
        idf = read_table(ipath)
        ids = _column(idf, item_col, ipath, "data.item_col").astype(str).tolist()
        cols = [_column(idf, c, ipath, "data.text_cols").fillna("").astype(str) for c in text_cols]
        titles = cols[0].tolist() if cols else [""] * len(ids)
        texts = (
            [". ".join(v for v in vals if v) for vals in zip(*[c.tolist() for c in cols], strict=True)]
            if cols
            else titles
        )
        catalog = Catalog(ids, titles, texts, source=str(ipath))
        unknown = ~items_s.isin(catalog.index)
        if unknown.any():
            row = int(unknown.to_numpy().nonzero()[0][0])
            raise DataError(
                f"unknown item {items_s.iloc[row]!r} (not in {ipath.name}); {int(unknown.sum())} such rows",
                path=path,
                line=_line(path, row),
                field=item_col,
            )
    else:
        ids = list(dict.fromkeys(items_s.tolist()))
        catalog = Catalog(ids, [""] * len(ids), [""] * len(ids), source=str(path))
    rows = (
        (u, catalog.index[i], t, n)
        for n, (u, i, t) in enumerate(zip(users_s, items_s, time_vals, strict=True))
    )
    users, seqs = _group(rows)
    return catalog, users, seqs
