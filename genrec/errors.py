"""Project errors. Every user-facing failure names its culprit: a file, a line, a field or a flag."""

from __future__ import annotations

from pathlib import Path


class GenrecError(Exception):
    """Base class for errors a user can act on (bad config, bad data, missing run artefact)."""


class ConfigError(GenrecError, ValueError):
    """An invalid configuration value; the message names the field or flag."""


class DataError(GenrecError, ValueError):
    """Invalid input data; names the file, and the line and field when known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        where = []
        if self.path:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if field:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class RunError(GenrecError):
    """A run directory lacks an artefact an earlier command should have written."""

    def __init__(self, run_dir: str | Path, missing: str, hint: str) -> None:
        super().__init__(f"run {run_dir}: {missing} is missing; {hint}")


def stopped_by(error: BaseException) -> str:
    """How a long job ended early, for its "how to go on" message: Ctrl-C or the error's type."""
    return "interrupted" if isinstance(error, KeyboardInterrupt) else f"stopped by {type(error).__name__}"
