"""Versioned prompt templates of one run: immutable versions, an active version per name, history.

Layout under `runs/<name>/templates/`::

    <template>/v0001.jinja   text of version 1, never rewritten
    <template>/v0001.json    {"version", "hash", "author", "created", "message", "parent"}
    <template>/state.json    {"active": 3, "activations": [{"version", "at", "by", "action"}, ...]}
    .lock                    flock-ed by every writer (CLI and server may write at once)

Templates shipped in `genrec/templates/builtin/` (and files a user dropped in `runs/<name>/prompts/`) show up as
version 1 of their name until the first save, which records them in the store as v1 (author
`genrec`, "imported from ...") and writes the new text as v2. Every write is temp file +
rename, so a crash leaves the previous state; concurrent edits are detected, not overwritten:
a write names the version it was based on (`If-Match`) and fails with `VersionConflict` when the
active version moved. Readers never lock: they see either the old state file or the new one.

Owns storage and the version rules. Rendering belongs to `genrec.templates.prompts`; which users to
validate against is the caller's (it passes a `check` function).
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genrec.data import Interactions
from genrec.errors import GenrecError
from genrec.run import RunDir, atomic_write_text
from genrec.templates.prompt_worker import RenderWorker, shared_worker
from genrec.templates.prompts import (
    _NAME,
    PROMPTS_DIR,
    PromptBuilder,
    PromptTemplate,
    TemplateProblem,
    parse_template,
)

logger = logging.getLogger(__name__)

MAX_TEMPLATE_BYTES = 64 * 1024


class TemplateNotFound(GenrecError):
    pass


class VersionConflict(GenrecError):
    """The template changed since the version the writer based its edit on."""

    def __init__(self, name: str, expected: int | None, current: TemplateVersion) -> None:
        self.current = current
        super().__init__(
            f"template {name!r} is at version {current.version} (active), not {expected}; "
            "reload it, reapply your edit and save again"
        )


@dataclass(frozen=True)
class TemplateVersion:
    name: str
    version: int
    hash: str
    author: str
    created: str
    message: str
    parent: int | None = None
    source: str = "store"
    """'store' for saved versions, or the path of the shipped file it was read from."""
    checked: bool = False
    """Rendered for the run's sample users when it was saved (the `check` of `save`), or a file the operators
    put there (shipped, imported): served on the sandbox's fast path (PromptTemplate.checked). Versions saved
    before the flag existed, or saved without a check, render under the line trace until activated with one."""

    @property
    def etag(self) -> str:
        return f'"{self.name}.v{self.version}.{self.hash}"'

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "etag": self.etag}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_name(name: str) -> str:
    if not _NAME.match(name) or len(name) > 64:
        raise TemplateProblem(f"invalid template name {name!r}: use letters, digits, '_', '-', '.' (max 64)")
    return name


class TemplateStore:
    def __init__(
        self, root: Path, *, shipped: Sequence[Path] = (PROMPTS_DIR,), recheck_s: float = 0.0
    ) -> None:
        """`recheck_s`: how long a state file's or shipped file's stat is trusted (0: every lookup checks the
        disk); the server trusts it briefly, so that a request's template lookup makes no file-system call."""
        self.root = Path(root)
        self.shipped = [Path(p) for p in shipped]
        self._cache: dict[tuple[str, int], PromptTemplate] = {}
        self._meta: dict[tuple[str, int], TemplateVersion] = {}
        """Saved versions' metadata: immutable, so read from disk once."""
        self._files = _FileCache(recheck_s)
        """state.json and shipped files, re-read only when they change on disk (another process saved)."""
        self._mutex = threading.Lock()
        self._checked: set[str] = set()
        """Hashes of texts that passed an activation's check in this process (see `activate`)."""

    @classmethod
    def for_run(cls, run_path: Path) -> TemplateStore:
        return cls(Path(run_path) / "templates", shipped=[Path(run_path) / "prompts", PROMPTS_DIR])

    @property
    def recheck_s(self) -> float:
        """How long a file's stat is trusted (see __init__)."""
        return self._files.recheck_s

    @recheck_s.setter
    def recheck_s(self, seconds: float) -> None:
        self._files.recheck_s = seconds

    # -- reading ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        found = {p.parent.name for p in self.root.glob("*/state.json")}
        for folder in self.shipped:
            found |= {p.stem for p in folder.glob("*.jinja") if _NAME.match(p.stem)}
        return sorted(found)

    def _shipped_file(self, name: str) -> Path | None:
        return next(
            (f / f"{name}.jinja" for f in self.shipped if self._files.exists(f / f"{name}.jinja")), None
        )

    def _state(self, name: str) -> dict[str, Any] | None:
        state: dict[str, Any] | None = self._files.get(self.root / name / "state.json", json.loads)
        return state

    def _shipped_version(self, name: str) -> tuple[TemplateVersion, str] | None:
        path = self._shipped_file(name)
        if path is None:
            return None

        def parse(text: str) -> tuple[TemplateVersion, str]:
            meta = TemplateVersion(
                name, 1, _hash(text), "genrec", "", f"shipped file {path.name}", None, str(path), checked=True
            )
            return meta, text

        found: tuple[TemplateVersion, str] | None = self._files.get(path, parse)
        return found

    def versions(self, name: str) -> list[TemplateVersion]:
        """Every version, oldest first."""
        check_name(name)
        if self._state(name) is None:
            shipped = self._shipped_version(name)
            if shipped is None:
                raise TemplateNotFound(f"template {name!r} not found (known: {', '.join(self.names())})")
            return [shipped[0]]
        numbers = sorted(int(p.stem[1:]) for p in (self.root / name).glob("v*.json"))
        return [self.version(name, n) for n in numbers]

    def activations(self, name: str) -> list[dict[str, Any]]:
        state = self._state(check_name(name))
        return list(state["activations"]) if state else []

    def active(self, name: str) -> TemplateVersion:
        state = self._state(check_name(name))
        if state is None:
            return self.versions(name)[0]
        return self.version(name, int(state["active"]))

    def version(self, name: str, version: int) -> TemplateVersion:
        if self._state(check_name(name)) is None:
            only = self.versions(name)[0]
            if version != only.version:
                raise TemplateNotFound(f"template {name!r} has no version {version} (it has 1)")
            return only
        meta = self._meta.get((name, version))
        if meta is None:
            path = self.root / name / f"v{version:04d}.json"
            if not path.is_file():
                raise TemplateNotFound(f"template {name!r} has no version {version}")
            meta = self._meta[(name, version)] = TemplateVersion(**json.loads(path.read_text()))
        return meta

    def text(self, name: str, version: int | None = None) -> str:
        v = self.active(name) if version is None else self.version(name, version)
        if v.source != "store":
            shipped = self._shipped_version(name)
            assert shipped is not None  # v came from it
            return shipped[1]
        return (self.root / name / f"v{v.version:04d}.jinja").read_text(encoding="utf-8")

    def template(self, name: str, version: int | None = None) -> tuple[TemplateVersion, PromptTemplate]:
        """A compiled template, compiled once per version (versions are immutable), `checked` when the version
        passed a check (TemplateVersion.checked, or an activation's check in this process)."""
        v = self.active(name) if version is None else self.version(name, version)
        key = (name, v.version)
        with self._mutex:
            t = self._cache.get(key)
        if t is None or t.hash != v.hash:
            t = parse_template(self.text(name, v.version), source=f"{name}@v{v.version}")
            with self._mutex:
                self._cache[key] = t
        t.checked = v.checked or v.hash in self._checked
        return v, t

    def diff(self, a: tuple[str, int | None], b: tuple[str, int | None]) -> str:
        """Unified diff of two (name, version) texts (version None: the active one)."""
        va = self.active(a[0]) if a[1] is None else self.version(*a)  # type: ignore[arg-type]
        vb = self.active(b[0]) if b[1] is None else self.version(*b)  # type: ignore[arg-type]
        return "".join(
            difflib.unified_diff(
                self.text(va.name, va.version).splitlines(keepends=True),
                self.text(vb.name, vb.version).splitlines(keepends=True),
                fromfile=f"{va.name}@v{va.version}",
                tofile=f"{vb.name}@v{vb.version}",
            )
        )

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._mutex, open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def exists(self, name: str) -> bool:
        return self._state(check_name(name)) is not None or self._shipped_file(name) is not None

    def save(
        self,
        name: str,
        text: str,
        *,
        author: str,
        message: str = "",
        base_version: int | None,
        activate: bool = True,
        check: Callable[[PromptTemplate], object] | None = None,
    ) -> TemplateVersion:
        """Validate and store `text` as a new version of `name` (created when new).

        `base_version` is the active version the edit started from (None only for a new name);
        when the active version is another, VersionConflict. `check` renders the parsed template
        against sample users and raises TemplateProblem; nothing is written when it fails.
        """
        check_name(name)
        if len(text.encode()) > MAX_TEMPLATE_BYTES:
            raise TemplateProblem(f"template {name!r} is larger than {MAX_TEMPLATE_BYTES} bytes")
        with self._locked():
            self._files.forget(self.root / name / "state.json")
            current = self.active(name) if self.exists(name) else None
            if current is not None and base_version != current.version:
                raise VersionConflict(name, base_version, current)
            if current is None and base_version is not None:
                raise TemplateNotFound(f"template {name!r} does not exist; create it without a base version")
            state = self._state(name) or self._import_shipped(name)
            number = max((int(p.stem[1:]) for p in (self.root / name).glob("v*.json")), default=0) + 1
            parsed = parse_template(text, source=f"{name}@v{number}")
            if parsed.name != name:
                raise TemplateProblem(
                    f"{name}@v{number}: line 2: front matter says name {parsed.name!r} but the "
                    f"template is {name!r}",
                    line=2,
                    column=1,
                )
            if check is not None:
                check(parsed)
            v = TemplateVersion(
                name,
                number,
                _hash(text),
                author,
                _now(),
                message,
                current.version if current else None,
                checked=check is not None,
            )
            folder = self.root / name
            atomic_write_text(folder / f"v{number:04d}.jinja", text)
            atomic_write_text(folder / f"v{number:04d}.json", json.dumps(asdict(v)))
            if activate or current is None:
                self._activate(name, state, number, author, "save")
            else:
                self._write_state(name, state)
        logger.info("template %s: saved v%d by %s", name, number, author)
        return v

    def _import_shipped(self, name: str) -> dict[str, Any]:
        """First save over a shipped template: record the shipped text as v1 so it can be rolled back to."""
        state: dict[str, Any] = {"active": None, "activations": []}
        shipped = self._shipped_version(name)
        if shipped is not None:
            meta, text = shipped
            shipped_as = f"{Path(meta.source).parent.name}/{Path(meta.source).name}"
            v1 = TemplateVersion(
                name, 1, meta.hash, "genrec", _now(), f"imported from {shipped_as}", checked=True
            )
            atomic_write_text(self.root / name / "v0001.jinja", text)
            atomic_write_text(self.root / name / "v0001.json", json.dumps(asdict(v1)))
            state = {
                "active": 1,
                "activations": [{"version": 1, "at": v1.created, "by": "genrec", "action": "import"}],
            }
        return state

    def _activate(self, name: str, state: dict[str, Any], version: int, by: str, action: str) -> None:
        state["active"] = version
        state["activations"].append({"version": version, "at": _now(), "by": by, "action": action})
        self._write_state(name, state)

    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        atomic_write_text(self.root / name / "state.json", json.dumps(state, indent=1))
        self._files.forget(self.root / name / "state.json")

    def activate(
        self,
        name: str,
        version: int,
        *,
        by: str,
        base_version: int | None = None,
        check: Callable[[PromptTemplate], object] | None = None,
    ) -> TemplateVersion:
        """Make `version` the one serving uses (`base_version`, when given, must be the active one). `check`, as
        for `save`, runs first, whatever the version passed when it was saved (the sandbox or the run's data may
        have changed since); nothing changes when it fails, and when it passes the version is served as checked."""
        with self._locked():
            self._files.forget(self.root / name / "state.json")
            current = self.active(name)
            if base_version is not None and base_version != current.version:
                raise VersionConflict(name, base_version, current)
            target = self.version(name, version)
            if check is not None:  # parsed here: template() takes the mutex this lock holds
                check(parse_template(self.text(name, version), source=f"{name}@v{version}"))
                self._checked.add(target.hash)
            state = self._state(name)
            if state is None:  # a shipped template has only v1, which is already active
                return target
            self._activate(name, dict(state, activations=list(state["activations"])), version, by, "activate")
        return target

    def rollback(self, name: str, *, by: str, base_version: int | None = None) -> TemplateVersion:
        """Re-activate the version that was active before the current one."""
        with self._locked():
            self._files.forget(self.root / name / "state.json")
            current = self.active(name)
            if base_version is not None and base_version != current.version:
                raise VersionConflict(name, base_version, current)
            state = self._state(name)
            stack = _undo_stack(state["activations"]) if state else []
            if state is None or len(stack) < 2:
                raise TemplateNotFound(f"template {name!r} has no earlier active version to roll back to")
            self._activate(
                name, dict(state, activations=list(state["activations"])), stack[-2], by, "rollback"
            )
            return self.version(name, stack[-2])


class _FileCache:
    """Parsed small files, re-parsed only when their (mtime, size) changes; missing files are None. With
    `recheck_s` > 0 a file's stat is reused for that long: a server looking up its active template for every
    request makes no file-system call between checks (its own saves `forget` at once; another process's
    are seen within `recheck_s`)."""

    def __init__(self, recheck_s: float = 0.0) -> None:
        self.recheck_s = recheck_s
        self._entries: dict[Path, tuple[tuple[int, int], Any]] = {}
        self._checked: dict[Path, tuple[float, tuple[int, int] | None]] = {}
        """Each path's last stat: (monotonic time, (mtime, size) or None where missing)."""

    def _key(self, path: Path) -> tuple[int, int] | None:
        now = time.monotonic()
        seen = self._checked.get(path)
        if seen is not None and now - seen[0] < self.recheck_s:
            return seen[1]
        try:
            st = path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        self._checked[path] = (now, key)
        return key

    def exists(self, path: Path) -> bool:
        return self._key(path) is not None

    def get(self, path: Path, parse: Callable[[str], Any]) -> Any:
        key = self._key(path)
        if key is None:
            return None
        hit = self._entries.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = parse(path.read_text(encoding="utf-8"))
        self._entries[path] = (key, value)
        return value

    def forget(self, path: Path) -> None:
        self._entries.pop(path, None)
        self._checked.pop(path, None)


def _undo_stack(activations: list[dict[str, Any]]) -> list[int]:
    """Versions that rollback walks back through: each rollback undoes one earlier activation."""
    stack: list[int] = []
    for a in activations:
        if a["action"] == "rollback":
            stack.pop()
        else:
            stack.append(a["version"])
    return stack


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TemplateChecker:
    """Renders a template for sample users of a run: the `check` that saves and `validate` use.

    Samples span history lengths (shortest, longest and evenly in between) because most template
    bugs are at the edges: an empty title, one item, a history longer than `max_history`. The template
    is not trusted yet, so it renders in a worker process with its own time and memory limits
    (genrec.templates.prompt_worker), never in the caller's.
    """

    def __init__(
        self,
        data: Interactions,
        make_builder: Callable[[PromptTemplate], PromptBuilder],
        *,
        n: int = 16,
        worker: RenderWorker | None = None,
    ) -> None:
        self.data, self.builder = data, make_builder
        self.worker = worker
        by_length = sorted(range(len(data)), key=lambda u: (len(data.sequences[u]), u))
        picks = (
            {by_length[round(k * (len(by_length) - 1) / max(n - 1, 1))] for k in range(n)}
            if by_length
            else set()
        )
        self.samples = sorted(picks)

    @classmethod
    def for_run(cls, run: RunDir, n: int = 16) -> TemplateChecker:
        cfg, data, ids = run.load_config(), run.load_data(), run.load_ids()
        return cls(data, lambda t: PromptBuilder.for_config(t, data.catalog, ids, cfg.prompt), n=n)

    def __call__(self, template: PromptTemplate) -> list[dict[str, Any]]:
        """Rendered messages per sample user; TemplateProblem (with the user named) on the first failure."""
        b = self.builder(template)
        users = [self.data.users[u] for u in self.samples]
        variables = [b.variables(self.data.sequences[u][:-1], self.data.users[u]) for u in self.samples]
        try:
            rendered = (self.worker or shared_worker()).render(template, variables)
        except TemplateProblem as e:
            index = getattr(e, "index", None)
            who = f" (rendering for user {users[index]!r})" if index is not None else ""
            raise TemplateProblem(f"{e}{who}", line=e.line, column=e.column) from None
        out = []
        for user, messages in zip(users, rendered, strict=True):
            if not messages[-1]["content"].strip():
                raise TemplateProblem(f"{template.source}: renders an empty user message for user {user!r}")
            out.append({"user": user, "messages": messages})
        return out
