"""Prompt templates: Jinja2 files with a YAML front-matter header, rendered in a sandbox.

A template turns a user's history into chat messages; the training target is the next item's
ID string. Owns loading, validation, hashing and rendering. Knows nothing of models or tokenizers.

File format (`prompts/<name>.jinja`)::

    ---
    name: default
    description: what it shows
    variables: [history, user]
    system: optional system message (itself a template)
    ---
    body: the user message (Jinja2)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from genrec.data import Catalog
from genrec.errors import GenrecError
from genrec.ids import ItemIds

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
KNOWN_VARIABLES = {"history", "user", "max_history", "title_words", "n_history_total"}
FRONT_KEYS = {"name", "description", "task", "variables", "system"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TemplateProblem(GenrecError):
    """A template that cannot be loaded or rendered; names the file, line and column when known."""


def _words(text: str, n: int) -> str:
    parts = str(text).split()
    return " ".join(parts[:n]) if n > 0 else ""


def _environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["words"] = _words
    return env


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

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variables) - KNOWN_VARIABLES)
        if unknown:
            raise TemplateProblem(
                f"{self.source}: unknown variable(s) {unknown}; available: {sorted(KNOWN_VARIABLES)}"
            )
        env = _environment()
        self._body = self._compile(env, self.body, self.body_line)
        self._system = self._compile(env, self.system, None) if self.system else None

    def _compile(self, env: SandboxedEnvironment, text: str, first_line: int | None) -> Any:
        try:
            return env.from_string(text)
        except TemplateSyntaxError as e:
            where = f"line {first_line + e.lineno - 1}" if first_line else "front matter 'system'"
            raise TemplateProblem(f"{self.source}: {where}: {e.message}") from None

    @property
    def hash(self) -> str:
        return hashlib.sha256((self.text or self.body).encode()).hexdigest()[:16]

    def render(self, variables: dict[str, Any]) -> list[dict[str, str]]:
        """Chat messages (system first when the template has one, then the user turn)."""
        try:
            user = self._body.render(**variables).strip()
            messages = []
            if self._system is not None:
                messages.append({"role": "system", "content": self._system.render(**variables).strip()})
        except UndefinedError as e:
            raise TemplateProblem(f"{self.source}: {e.message}") from None
        except TemplateError as e:
            line = _template_line(e)
            where = f" line {self.body_line + line - 1}:" if line else ""
            raise TemplateProblem(f"{self.source}:{where} {e}") from None
        messages.append({"role": "user", "content": user})
        return messages


def _template_line(e: Exception) -> int | None:
    tb = e.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def parse_template(text: str, *, source: str = "<string>") -> PromptTemplate:
    """Split front matter from body and build a template (compiled, not yet rendered)."""
    meta: dict[str, Any] = {}
    body, body_line = text, 1
    if text.startswith("---"):
        lines = text.split("\n")
        try:
            end = lines.index("---", 1)
        except ValueError:
            raise TemplateProblem(
                f"{source}: front matter starts on line 1 but has no closing '---'"
            ) from None
        try:
            meta = yaml.safe_load("\n".join(lines[1:end])) or {}
        except yaml.YAMLError as e:
            raise TemplateProblem(f"{source}: front matter is not valid YAML: {e}") from None
        if not isinstance(meta, dict):
            raise TemplateProblem(f"{source}: front matter must be a mapping")
        unknown = sorted(set(meta) - FRONT_KEYS)
        if unknown:
            raise TemplateProblem(
                f"{source}: unknown front-matter key(s) {unknown}; known: {sorted(FRONT_KEYS)}"
            )
        body, body_line = "\n".join(lines[end + 1 :]), end + 2
    name = str(meta.get("name") or Path(source).stem)
    return PromptTemplate(
        name=name,
        body=body,
        description=str(meta.get("description", "")),
        system=meta.get("system"),
        variables=list(meta.get("variables", [])),
        task=str(meta.get("task", "next_item")),
        source=source,
        body_line=body_line,
        text=text,
    )


def template_path(name: str, search: Sequence[Path] = ()) -> Path:
    """Resolve a template name (in the search folders, then prompts/) or a path to a .jinja file."""
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

    def item_view(self, item: int) -> dict[str, Any]:
        return {
            "id": self.catalog.item_ids[item],
            "sid": self.ids.item_string(item),
            "title": self.catalog.titles[item],
            "text": self.catalog.texts[item],
            "attributes": self.catalog.attributes[item],
        }

    def variables(self, history: Sequence[int], user: str | None = None) -> dict[str, Any]:
        shown = list(history)[-self.max_history :]
        return {
            "history": [self.item_view(i) for i in shown],
            "user": user or "",
            "max_history": self.max_history,
            "title_words": self.title_words,
            "n_history_total": len(history),
        }

    def messages(self, history: Sequence[int], user: str | None = None) -> list[dict[str, str]]:
        return self.template.render(self.variables(history, user))

    def target(self, item: int) -> str:
        return self.ids.item_string(item)
