"""`genrec prompts ...`: list, show, render, validate, diff and edit the run's versioned templates.

Thin commands over genrec.templates.prompt_store; the server's /v1/templates API and /editor page use the
same store, so a version saved here is served on the next request without a restart.
"""

from __future__ import annotations

import getpass
import json
import re
from pathlib import Path
from typing import Annotated

import typer

from genrec.errors import GenrecError
from genrec.run import RunDir
from genrec.templates.prompt_store import TemplateChecker, TemplateStore, TemplateVersion
from genrec.templates.prompts import TemplateProblem, parse_template

prompts_app = typer.Typer(
    help="Prompt templates of a run: every save is a new immutable version; one version per "
    "template is active (what serving and training use). Templates shipped in genrec/templates/builtin/ appear as v1.",
    no_args_is_help=True,
)

RunOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory, e.g. runs/demo.")]
VersionOpt = Annotated[
    int | None, typer.Option("--version", "-v", help="A saved version (default: the active one).")
]
AuthorOpt = Annotated[str, typer.Option(help="Recorded as the version's author.")]


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "cli"


def _store(run: Path) -> TemplateStore:
    return TemplateStore.for_run(RunDir(run).path)


def _trained_hash(run: Path) -> str | None:
    hash_: str | None = RunDir(run).meta().get("template", {}).get("hash")
    return hash_


def _flag(v: TemplateVersion, trained: str | None) -> str:
    if trained is None:
        return "untrained run"
    return "as trained" if v.hash == trained else "DIFFERS from the trained template"


def _ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name@v3` / `name@3`."""
    name, _, version = ref.partition("@")
    if not version:
        return name, None
    try:
        return name, int(version.lstrip("v"))
    except ValueError:
        raise GenrecError(f"{ref!r}: expected NAME or NAME@vN") from None


@prompts_app.command("list")
def list_(run: RunOpt) -> None:
    """Every template with its active version, hash, author and whether the model was trained with it."""
    store, trained = _store(run), _trained_hash(run)
    default = RunDir(run).load_config().prompt.template
    for name in store.names():
        v, t = store.template(name)
        mark = "*" if name == default else " "
        typer.echo(
            f"{mark} {name:<20} v{v.version:<4} {v.hash}  {v.author:<10} {v.created or '-':<25} "
            f"{_flag(v, trained):<34} {t.description}"
        )
    typer.echo("(* = the run's template)")


@prompts_app.command()
def show(run: RunOpt, name: str, version: VersionOpt = None) -> None:
    """Print a template's text (the active version, or --version N)."""
    store = _store(run)
    v = store.active(name) if version is None else store.version(name, version)
    typer.echo(f"# {name} v{v.version} {v.hash} by {v.author}: {_flag(v, _trained_hash(run))}", err=True)
    typer.echo(store.text(name, v.version), nl=False)


@prompts_app.command()
def render(
    run: RunOpt,
    name: str,
    user: Annotated[
        str | None, typer.Option(help="A user id of the run's data (their full history).")
    ] = None,
    history: Annotated[str | None, typer.Option(help="Item ids, comma-separated, oldest first.")] = None,
    version: VersionOpt = None,
    file: Annotated[
        Path | None, typer.Option(help="Render this unsaved file instead of a saved version.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the chat messages as JSON.")] = False,
) -> None:
    """Show the exact chat messages a template produces for a user or a history."""
    rd = RunDir(run)
    checker = TemplateChecker.for_run(rd, n=1)
    if file is not None:
        template = parse_template(file.read_text(encoding="utf-8"), source=str(file))
    else:
        template = _store(run).template(name, version)[1]
    if history is not None:
        refs = [h.strip() for h in history.split(",") if h.strip()]
        unknown = [h for h in refs if h not in checker.data.catalog.index]
        if unknown:
            raise GenrecError(f"--history: unknown item(s) {unknown[:10]}")
        items = [checker.data.catalog.index[h] for h in refs]
    else:
        user = user or checker.data.users[checker.samples[0]]
        index = checker.data.user_index()
        if user not in index:
            raise GenrecError(f"--user: unknown user {user!r}")
        items = checker.data.sequences[index[user]]
    messages = checker.builder(template).messages(items, user)
    if as_json:
        typer.echo(json.dumps(messages, indent=2, ensure_ascii=False))
        return
    for m in messages:
        typer.echo(f"--- {m['role']} ---\n{m['content']}")


@prompts_app.command()
def validate(
    run: RunOpt,
    name: Annotated[str | None, typer.Argument(help="Template (default: all of them).")] = None,
    file: Annotated[Path | None, typer.Option(help="Validate an unsaved file.")] = None,
    users: Annotated[
        int, typer.Option(help="Sample users to render for (shortest to longest history).")
    ] = 16,
) -> None:
    """Render templates for sample users of the run; on error print FILE:LINE:COLUMN and exit 1."""
    rd = RunDir(run)
    checker = TemplateChecker.for_run(rd, n=users)
    store = _store(run)
    targets = (
        [(str(file), lambda: parse_template(file.read_text(encoding="utf-8"), source=str(file)))]
        if file
        else [(n, lambda n=n: store.template(n)[1]) for n in ([name] if name else store.names())]
    )
    failed = 0
    for label, load in targets:
        try:
            rendered = checker(load())
        except TemplateProblem as e:
            failed += 1
            where = f"{label}:{e.line or 0}:{e.column or 0}"
            # the message starts with "SOURCE: line N, column M: " too; say the location once
            detail = re.sub(r"^.*?: line \d+(, column \d+)?: ", "", str(e), count=1) if e.line else str(e)
            typer.echo(f"{where}: error: {detail}", err=True)
            continue
        longest = max(len(r["messages"][-1]["content"]) for r in rendered)
        typer.echo(f"{label}: ok ({len(rendered)} users, longest prompt {longest} characters)")
    if failed:
        raise typer.Exit(1)


@prompts_app.command()
def diff(run: RunOpt, a: str, b: str) -> None:
    """Unified diff of two templates or versions: NAME or NAME@vN (e.g. default@v1 default)."""
    out = _store(run).diff(_ref(a), _ref(b))
    typer.echo(out, nl=not out.endswith("\n"))


@prompts_app.command()
def history(run: RunOpt, name: str) -> None:
    """Every version of a template (newest first) and the log of activations."""
    store, trained = _store(run), _trained_hash(run)
    active = store.active(name).version
    for v in reversed(store.versions(name)):
        mark = "*" if v.version == active else " "
        typer.echo(
            f"{mark} v{v.version:<4} {v.hash} {v.author:<10} {v.created or '-':<25} {_flag(v, trained):<34} {v.message}"
        )
    for a in store.activations(name):
        typer.echo(f"  {a['at']} {a['action']:<8} v{a['version']} by {a['by']}")


@prompts_app.command()
def new(
    run: RunOpt,
    name: str,
    from_: Annotated[str, typer.Option("--from", help="Template to copy (NAME or NAME@vN).")] = "default",
    message: Annotated[str, typer.Option("-m", "--message", help="Why this template exists.")] = "",
    author: AuthorOpt = _whoami(),
) -> None:
    """Create a template as a copy of another (its front-matter name rewritten); then edit with `save`."""
    store = _store(run)
    if store.exists(name):
        raise GenrecError(f"template {name!r} already exists (use `genrec prompts save`)")
    base, version = _ref(from_)
    text = _rename(store.text(base, version), name)
    v = store.save(
        name,
        text,
        author=author,
        message=message or f"new, from {from_}",
        base_version=None,
        check=TemplateChecker.for_run(RunDir(run)),
    )
    typer.echo(f"created {name} v{v.version} ({v.hash}) from {from_}")


def _rename(text: str, name: str) -> str:
    if not text.startswith("---"):
        return f"---\nname: {name}\n---\n{text}"
    lines = text.split("\n")
    end = lines.index("---", 1)
    body = [ln for ln in lines[1:end] if not ln.startswith("name:")]
    return "\n".join(["---", f"name: {name}", *body, *lines[end:]])


@prompts_app.command()
def save(
    run: RunOpt,
    name: str,
    file: Annotated[Path, typer.Option(help="The template file to save as the next version.")],
    message: Annotated[str, typer.Option("-m", "--message", help="What changed and why.")] = "",
    base: Annotated[
        int | None, typer.Option(help="Version your edit started from; refused if another is active now.")
    ] = None,
    activate: Annotated[bool, typer.Option(help="Serve the new version at once.")] = True,
    author: AuthorOpt = _whoami(),
) -> None:
    """Validate a file against sample users and save it as a new version (created if new)."""
    store = _store(run)
    if base is None and store.exists(name):
        base = store.active(name).version
    v = store.save(
        name,
        file.read_text(encoding="utf-8"),
        author=author,
        message=message,
        base_version=base,
        activate=activate,
        check=TemplateChecker.for_run(RunDir(run)),
    )
    typer.echo(f"saved {name} v{v.version} ({v.hash}){' and activated it' if activate else ''}")


@prompts_app.command()
def activate(run: RunOpt, name: str, version: int, author: AuthorOpt = _whoami()) -> None:
    """Make a saved version the active one, once it renders for sample users (serving picks it up on the next
    request)."""
    v = _store(run).activate(name, version, by=author, check=TemplateChecker.for_run(RunDir(run)))
    typer.echo(f"{name}: v{v.version} is active")


@prompts_app.command()
def rollback(run: RunOpt, name: str, author: AuthorOpt = _whoami()) -> None:
    """Re-activate the version that was active before the current one."""
    v = _store(run).rollback(name, by=author)
    typer.echo(f"{name}: rolled back to v{v.version}")
