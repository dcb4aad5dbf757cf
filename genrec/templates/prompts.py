"""Prompt templates: Jinja2 files with a YAML front-matter header, rendered in a sandbox.

A template turns a user's history into chat messages; the training target is the next item's
ID string. Owns loading, validation, hashing and rendering. Knows nothing of models or tokenizers.

File format (`genrec/templates/builtin/<name>.jinja`)::

    ---
    name: default
    description: what it shows
    task: next_item
    variables: [history, user]          # declared inputs (checked against KNOWN_VARIABLES)
    system: optional system message     # the default chat roles: this system turn, then
    ---                                 # the body as the user turn
    body: the user message (Jinja2)

Templates are untrusted code (they are edited over HTTP); they render in `genrec.templates.sandbox`'s
bounded sandbox. Helpers: `history | recent(n)` (the last n items), `item | format_item`
(ID plus the first `title_words` title words), `text | words(n)`, and Jinja's own `join`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SecurityError

from genrec.config import PromptConfig
from genrec.data import Catalog
from genrec.errors import GenrecError
from genrec.ids import ItemIds
from genrec.templates.sandbox import TEMPLATE_FILENAME, BoundedSandbox, RenderLimits, TemplateLimitExceeded

# The shipped templates are package data (genrec/templates/builtin/*.jinja), found through the import system so
# an installed wheel has them too; a wheel installs unpacked, so the folder is a real path.
PROMPTS_DIR = Path(str(resources.files("genrec.templates") / "builtin"))
KNOWN_VARIABLES = {"history", "user", "max_history", "title_words", "n_history_total", "query", "item"}
FRONT_TYPES = {"name": "text", "description": "text", "task": "text", "system": "text", "variables": "list"}
"""What each front-matter key holds: `text` a scalar (or nothing), `list` a sequence of scalars."""
FRONT_KEYS = set(FRONT_TYPES)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TemplateProblem(GenrecError):
    """A template that cannot be loaded or rendered; names the file, line and column when known."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line, self.column = line, column


def _words(text: str, n: int) -> str:
    parts = str(text).split()
    return " ".join(parts[:n]) if n > 0 else ""


def _recent(items: Sequence[Any], n: int) -> list[Any]:
    return list(items)[-n:] if n > 0 else []


def _format_item(item: dict[str, Any], title_words: int = 8) -> str:
    title = _words(item.get("title") or "", title_words)
    return f"{item['sid']} {title}".strip()


@lru_cache(maxsize=4)
def environment(limits: RenderLimits = RenderLimits()) -> BoundedSandbox:
    """The shared bounded sandbox (one per set of limits)."""
    env = BoundedSandbox(
        limits, undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True
    )
    env.filters.update(
        {"words": env._guard(_words), "recent": env._guard(_recent), "format_item": env._guard(_format_item)}
    )
    return env


_JINJA_SYNTAX = re.compile(r"[{}\r]")
"""What could make a text render as something other than itself (tags, expressions, comments; `\r\n`, which Jinja
rewrites); text without any of it renders to itself, less a trailing newline."""
_UNCLOSED = re.compile(r"innermost block that needs to be closed is '(\w+)'")
_QUOTED = re.compile(r"'([^']{1,80})'")


def _column(line_text: str, message: str) -> int | None:
    """1-based column of the token an error message names (Jinja reports lines only)."""
    for token in _QUOTED.findall(message):
        at = line_text.find(token)
        if at >= 0:
            return at + 1
    tag = re.search(r"\{[{%]", line_text)
    return tag.start() + 1 if tag else None


@dataclass
class PromptTemplate:
    name: str
    body: str
    description: str = ""
    system: str | None = None
    variables: list[str] = field(default_factory=list)
    task: str = "next_item"
    source: str = "<string>"
    body_line: int = 1
    """Line of the file where the body starts (for error messages)."""
    text: str = ""
    """The whole file as read; hashed for provenance."""

    limits: RenderLimits = field(default_factory=RenderLimits)
    checked: bool = False
    """Passed the check against the run's sample users when saved or activated (TemplateStore sets it): renders
    in-process timed by the sandbox's ticks alone. False: under the line trace as well (genrec.templates.sandbox)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variables) - KNOWN_VARIABLES)
        if unknown:
            raise TemplateProblem(
                f"{self.source}: unknown variable(s) {unknown}; available: {sorted(KNOWN_VARIABLES)}",
                line=1,
                column=1,
            )
        self._env = environment(self.limits)
        self._body = self._compile(self.body, self.body_line)
        self._system = self._compile(self.system, None) if self.system else None
        self._system_text = (
            self.system.strip() if self.system and not _JINJA_SYNTAX.search(self.system) else None
        )
        """The system message when it is plain text (the usual case): the same every time, so not rendered (a
        render of constant text costs about 10 µs, a fifth of a prompt's)."""

    def _problem(
        self, message: str, template_line: int | None, *, in_system: bool = False
    ) -> TemplateProblem:
        """An error located in the file: line (and column of the named token) of the template source."""
        if in_system or template_line is None:
            where = "front matter 'system'" if in_system else ""
            return TemplateProblem(f"{self.source}: {where + ': ' if where else ''}{message}")
        line = self.body_line + template_line - 1
        lines = self.text.split("\n") if self.text else self.body.split("\n")
        unclosed = _UNCLOSED.search(message)
        if unclosed:  # Jinja reports the end of the file; the useful place is the unclosed tag
            opener = re.compile(r"\{%-?\s*" + re.escape(unclosed.group(1)) + r"\b")
            for k in range(min(line, len(lines)) - 1, self.body_line - 2, -1):
                m = opener.search(lines[k])
                if m:
                    line, message = k + 1, f"{message} (the unclosed '{unclosed.group(1)}' opens here)"
                    break
        col = (_column(lines[line - 1], message) if 0 < line <= len(lines) else None) or 1
        return TemplateProblem(f"{self.source}: line {line}, column {col}: {message}", line=line, column=col)

    def _compile(self, text: str, first_line: int | None) -> Any:
        try:
            return self._env.from_string(text)
        except TemplateSyntaxError as e:
            raise self._problem(e.message or str(e), e.lineno, in_system=first_line is None) from None
        except RecursionError:  # thousands of nested brackets: Jinja's parser recurses
            raise self._problem("nested too deeply to compile", None, in_system=first_line is None) from None

    @property
    def hash(self) -> str:
        return hashlib.sha256((self.text or self.body).encode()).hexdigest()[:16]

    def render(self, variables: dict[str, Any]) -> list[dict[str, str]]:
        """Chat messages (system first when the template has one, then the user turn).

        Bounded by `self.limits` (time, size); any failure is a TemplateProblem with the line.
        """
        messages = []
        if self._system_text is not None:
            messages.append({"role": "system", "content": self._system_text})
        elif self._system is not None:
            messages.append({"role": "system", "content": self._render(self._system, variables, True)})
        messages.append({"role": "user", "content": self._render(self._body, variables, False)})
        return messages

    def _render(self, compiled: Any, variables: dict[str, Any], in_system: bool) -> str:
        try:
            rendered = self._env.render_bounded(
                lambda: compiled.generate(**variables), traced=not self.checked
            )
            return rendered.strip()
        except (UndefinedError, SecurityError, TemplateLimitExceeded) as e:
            raise self._problem(str(e.message or e), _template_line(e), in_system=in_system) from None
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:
            message = "recursion too deep" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
            raise self._problem(message, _template_line(e), in_system=in_system) from None


def _template_line(e: Exception) -> int | None:
    tb = e.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class _FrontMatterLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of aliases expand to 10^8 nodes (a billion
    laughs), and front matter has no use for them. Refused when the parser meets them, before anything
    is expanded, so a document composes to a graph no bigger than its text."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(
                problem="anchors and aliases ('&', '*') are not allowed in front matter",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)


def _front_matter(front: str, *, source: str) -> dict[str, Any]:
    """The front matter's keys, each checked for its type (FRONT_TYPES) where it is written; a problem
    names the file's line and column (the header starts on line 2)."""

    def problem(message: str, mark: Any) -> TemplateProblem:
        line, col = (mark.line + 2, mark.column + 1) if mark is not None else (2, 1)
        return TemplateProblem(f"{source}: line {line}, column {col}: {message}", line=line, column=col)

    try:
        root = yaml.compose(front, Loader=_FrontMatterLoader)
    except yaml.YAMLError as e:
        detail = getattr(e, "problem", None) or e
        raise problem(f"front matter is not valid YAML: {detail}", getattr(e, "problem_mark", None)) from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise problem("front matter must be a mapping of keys to values", root.start_mark)
    meta: dict[str, Any] = {}
    for key_node, value_node in root.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key not in FRONT_TYPES:
            raise problem(
                f"unknown front-matter key(s) {[key]}; known: {sorted(FRONT_KEYS)}", key_node.start_mark
            )
        if key in meta:
            raise problem(f"front-matter key {key!r} is given twice", key_node.start_mark)
        meta[key] = _front_value(key, value_node, problem)
    return meta


def _front_value(key: str, node: Any, problem: Callable[[str, Any], TemplateProblem]) -> Any:
    def scalar(n: Any, what: str) -> str | None:
        if not isinstance(n, yaml.ScalarNode):
            kind = "a list" if isinstance(n, yaml.SequenceNode) else "a mapping"
            raise problem(f"{what} must be text, not {kind}", n.start_mark)
        return None if n.tag == "tag:yaml.org,2002:null" else str(n.value)

    if FRONT_TYPES[key] == "text":
        return scalar(node, f"front-matter {key!r}")
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise problem(f"front-matter {key!r} must be a list of names, e.g. [history, user]", node.start_mark)
    return [scalar(item, f"each of {key!r}") or "" for item in node.value]


def parse_template(
    text: str, *, source: str = "<string>", limits: RenderLimits | None = None
) -> PromptTemplate:
    """Split front matter from body and build a template (compiled, not yet rendered)."""
    meta: dict[str, Any] = {}
    body, body_line = text, 1
    if text.startswith("---"):
        lines = text.split("\n")
        try:
            end = lines.index("---", 1)
        except ValueError:
            raise TemplateProblem(
                f"{source}: line 1: front matter starts here but has no closing '---'", line=1, column=1
            ) from None
        meta = _front_matter("\n".join(lines[1:end]), source=source)
        body, body_line = "\n".join(lines[end + 1 :]), end + 2
    return PromptTemplate(
        name=meta.get("name") or Path(source).stem,
        body=body,
        description=meta.get("description") or "",
        system=meta.get("system"),
        variables=meta.get("variables", []),
        task=meta.get("task") or "next_item",
        source=source,
        body_line=body_line,
        text=text,
        limits=limits or RenderLimits(),
    )


def template_path(name: str, search: Sequence[Path] = ()) -> Path:
    """Resolve a template name (in the search folders, then genrec/templates/builtin/) or a path to a .jinja file."""
    p = Path(name)
    if p.suffix == ".jinja" and p.is_file():
        return p
    if not _NAME.match(name):
        raise TemplateProblem(f"invalid template name {name!r}: use letters, digits, '_', '-', '.'")
    for folder in [*search, PROMPTS_DIR]:
        candidate = Path(folder) / f"{name}.jinja"
        if candidate.is_file():
            return candidate
    raise TemplateProblem(f"template {name!r} not found in {[str(f) for f in [*search, PROMPTS_DIR]]}")


def load_template(name: str, search: Sequence[Path] = ()) -> PromptTemplate:
    path = template_path(name, search)
    return parse_template(path.read_text(encoding="utf-8"), source=str(path))


class PromptBuilder:
    """Renders histories (catalogue rows) into chat messages and targets into ID strings."""

    def __init__(
        self, template: PromptTemplate, catalog: Catalog, ids: ItemIds, *, max_history: int, title_words: int
    ) -> None:
        self.template, self.catalog, self.ids = template, catalog, ids
        self.max_history, self.title_words = max_history, title_words

    @classmethod
    def for_config(
        cls, template: PromptTemplate, catalog: Catalog, ids: ItemIds, cfg: PromptConfig
    ) -> PromptBuilder:
        """A builder with the run's prompt settings (`prompt.max_history`, `prompt.title_words`)."""
        return cls(template, catalog, ids, max_history=cfg.max_history, title_words=cfg.title_words)

    def item_view(self, item: int) -> dict[str, Any]:
        return {
            "id": self.catalog.item_ids[item],
            "sid": self.ids.item_string(item),
            "token": self.ids.input_token(item),
            "title": self.catalog.titles[item],
            "text": self.catalog.texts[item],
            "attributes": self.catalog.attributes[item],
        }

    def variables(
        self,
        history: Sequence[int],
        user: str | None = None,
        *,
        query: str | None = None,
        item: int | None = None,
    ) -> dict[str, Any]:
        """What a template sees: the last max_history items, the user, the free-text `query` ('' when none)
        and `item`: the item of a single-item task (item text -> ID, ID -> title), or else the most recent item."""
        shown = list(history)[-self.max_history :]
        return {
            "history": [self.item_view(i) for i in shown],
            "user": user or "",
            "max_history": self.max_history,
            "title_words": self.title_words,
            "n_history_total": len(history),
            "query": query or "",
            "item": self.item_view(item if item is not None else self._default_item(shown)),
        }

    def _default_item(self, shown: list[int]) -> int:
        """The item a single-item template shows when rendered for a user (previews, sample-user checks): the
        user's most recent item."""
        return shown[-1] if shown else 0

    def messages(
        self, history: Sequence[int], user: str | None = None, *, query: str | None = None
    ) -> list[dict[str, str]]:
        return self.template.render(self.variables(history, user, query=query))

    def item_messages(self, item: int) -> list[dict[str, str]]:
        """The prompt of a single-item task (genrec/templates/builtin/item_text.jinja, genrec/templates/builtin/item_title.jinja)."""
        return self.template.render(self.variables([], item=item))

    def target(self, item: int) -> str:
        return self.ids.item_string(item)
