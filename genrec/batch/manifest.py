"""A batch job's manifest: the chunks committed so far (each chunk's rows and rejects written by temp
file + rename, then recorded), the settings and input stamp a resumed job must match, and the
rejects counted by kind.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from genrec.batch.input import _OLD_STAMPS, INPUT_STAMP, Reject
from genrec.errors import GenrecError
from genrec.run import atomic_write_text


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


def rejects_path(output: Path) -> Path:
    """Where the rejects of a job writing `output` go: `<output stem>.rejects.jsonl` beside it."""
    return output.with_name(output.stem + ".rejects.jsonl")


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
