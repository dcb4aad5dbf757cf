"""Versioned templates: the store (versions, activation, rollback, conflicts, crash safety), the
`/v1/templates` API (auth, 422 with line/column, If-Match, live pickup) and the editor page."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest

from genrec.recommender import Recommender
from genrec.run import RunDir
from genrec.serve.app import create_app
from genrec.serve.protocol import APIError
from genrec.serve.service import RecService
from genrec.templates.prompt_store import TemplateChecker, TemplateNotFound, TemplateStore, VersionConflict
from genrec.templates.prompts import PROMPTS_DIR, PromptBuilder, TemplateProblem
from tests.conftest import copy_run
from tests.test_server import LiveServer

ADMIN, READER = "admin-secret", "reader-key"
DEFAULT = (PROMPTS_DIR / "default.jinja").read_text()
EDITED = DEFAULT.replace("Next item ID?", "Which item comes next? (edited)")


def store_at(tmp_path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates", shipped=[PROMPTS_DIR])


def test_shipped_template_is_v1_until_the_first_save(tmp_path):
    s = store_at(tmp_path)
    assert "default" in s.names() and "ids_only" in s.names()
    v1 = s.active("default")
    assert v1.version == 1 and s.text("default") == DEFAULT and not (tmp_path / "templates").exists()
    v2 = s.save("default", EDITED, author="alice", message="reword", base_version=1)
    assert (v2.version, v2.parent, v2.author, s.active("default").version) == (2, 1, "alice", 2)
    assert [v.version for v in s.versions("default")] == [1, 2]
    assert s.text("default", 1) == DEFAULT and s.text("default") == EDITED  # v1 kept, immutable
    assert "-Next item ID?" in s.diff(("default", 1), ("default", 2))


def test_conflicting_edits_are_detected_not_overwritten(tmp_path):
    s = store_at(tmp_path)
    s.save("default", EDITED, author="alice", base_version=1)
    with pytest.raises(VersionConflict, match="at version 2"):
        s.save("default", EDITED + "\nbob", author="bob", base_version=1)  # bob edited v1
    with pytest.raises(VersionConflict):
        s.save("default", EDITED, author="bob", base_version=None)
    assert s.active("default").version == 2 and len(s.versions("default")) == 2


def test_concurrent_writers_get_distinct_versions(tmp_path):
    """Writers in threads (the server) and a second store object (the CLI) never share a number."""
    s1, s2 = store_at(tmp_path), store_at(tmp_path)
    s1.save(
        "t", "---\nname: t\n---\nv0 {{ history | length }}", author="a", base_version=None, activate=False
    )
    errors = []

    def writer(store, k):
        for i in range(5):
            try:
                store.save(
                    "t", f"---\nname: t\n---\n{k}-{i}", author=f"w{k}", base_version=None, activate=False
                )
            except Exception as e:  # pragma: no cover - the assertion below reports it
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(s, k)) for k, s in enumerate([s1, s2, s1, s2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # base_version=None on an existing template conflicts by design; every writer was refused or
    # got its own number, and nothing was half-written
    versions = s1.versions("t")
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert all(isinstance(e, VersionConflict) for e in errors)


def test_activate_and_rollback_walk_back_through_history(tmp_path):
    s = store_at(tmp_path)
    s.save("default", EDITED, author="a", base_version=1)
    s.save("default", EDITED + "\nthree", author="a", base_version=2)
    assert s.rollback("default", by="a").version == 2
    assert s.rollback("default", by="a").version == 1
    with pytest.raises(TemplateNotFound, match="no earlier"):
        s.rollback("default", by="a")
    assert s.activate("default", 3, by="a").version == 3
    assert [a["action"] for a in s.activations("default")] == [
        "import", "save", "save", "rollback", "rollback", "activate"
    ]  # fmt: skip


def test_invalid_templates_and_names_are_refused_before_anything_is_written(tmp_path, small_data):
    from genrec.ids import atomic_ids

    s = store_at(tmp_path)
    ids = atomic_ids(len(small_data.catalog))
    check = TemplateChecker(
        small_data, lambda t: PromptBuilder(t, small_data.catalog, ids, max_history=5, title_words=2)
    )
    bad = DEFAULT.replace("{% endfor %}", "")
    with pytest.raises(TemplateProblem) as err:
        s.save("default", bad, author="a", base_version=1, check=check)
    assert err.value.line is not None and err.value.column is not None
    with pytest.raises(TemplateProblem, match="rendering for user"):
        s.save(
            "default",
            DEFAULT.replace("Next item ID?", "{{ history[0].nope }}"),
            author="a",
            base_version=1,
            check=check,
        )
    with pytest.raises(TemplateProblem, match="front matter says name"):
        s.save("other", DEFAULT, author="a", base_version=None)
    for name in ["../x", "a/b", "", ".hidden", "x" * 65]:
        with pytest.raises(TemplateProblem, match="invalid template name"):
            s.save(name, "hi", author="a", base_version=None)
    assert not (tmp_path / "templates" / "default" / "v0002.jinja").exists()
    assert s.active("default").version == 1


def test_a_crash_mid_save_leaves_the_previous_state(tmp_path, monkeypatch):
    import genrec.templates.prompt_store as ps

    s = store_at(tmp_path)
    s.save("default", EDITED, author="a", base_version=1)
    real = ps.atomic_write_text

    def dying(path, text):
        if path.name == "state.json":
            raise OSError("disk full")
        real(path, text)

    monkeypatch.setattr(ps, "atomic_write_text", dying)
    with pytest.raises(OSError):
        s.save("default", EDITED + "\nx", author="a", base_version=2)
    monkeypatch.undo()
    fresh = store_at(tmp_path)
    assert fresh.active("default").version == 2 and fresh.text("default") == EDITED
    # the orphan v3 file is never active; the next save takes the next free number
    assert fresh.save("default", EDITED + "\ny", author="a", base_version=2).version == 4


# -- API -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory):
    return copy_run(trained_run[0], tmp_path_factory, "tpl")


@pytest.fixture(scope="module")
def api(run_copy):
    rec = Recommender.load(run_copy, device="cpu")
    app = create_app(RecService(rec, model_name="tiny-run"), api_keys=[READER], admin_keys={ADMIN: "alice"})
    with LiveServer(app) as s:
        yield s, rec


def http(api, key=ADMIN):
    return httpx.Client(base_url=api[0].url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_template_api_edit_cycle_and_live_pickup(api):
    server, rec = api
    c = http(api)
    listing = c.get("/v1/templates").json()
    default = next(t for t in listing["data"] if t["name"] == "default")
    assert (
        default["is_default"]
        and default["matches_training"]
        and listing["trained"]["hash"] == default["hash"]
    )
    got = c.get("/v1/templates/default")
    assert got.status_code == 200 and got.headers["etag"] == default["etag"]
    text = got.json()["text"]

    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=READER, max_retries=0)
    hist = [rec.catalog.item_ids[i] for i in rec.user_history(rec.data.users[3])[-4:]]
    before = oa.chat.completions.create(
        model="tiny-run", messages=[{"role": "user", "content": ""}], extra_body={"history": hist}
    )
    assert before.model_extra["template"]["matches_training"] is True

    new = text.replace("Next item ID?", "Next item ID, please?")
    preview = c.post("/v1/templates/default/preview", json={"text": new, "user": rec.data.users[3]}).json()
    assert "Next item ID, please?" in preview["messages"][-1]["content"]
    assert len(preview["recommendations"]) == 10 and preview["template"]["matches_training"] is False

    saved = c.put(
        "/v1/templates/default",
        json={"text": new, "message": "polite"},
        headers={"If-Match": got.headers["etag"]},
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["version"] == 2 and saved.json()["author"] == "alice"
    after = oa.chat.completions.create(
        model="tiny-run", messages=[{"role": "user", "content": ""}], extra_body={"history": hist}
    )
    info = after.model_extra["template"]
    assert (info["version"], info["matches_training"]) == (2, False)  # no restart needed

    stale = c.put(
        "/v1/templates/default", json={"text": new + "\n"}, headers={"If-Match": got.headers["etag"]}
    )
    assert stale.status_code == 412 and stale.headers["etag"] == saved.headers["etag"]
    assert c.put("/v1/templates/default", json={"text": new + "\n"}).status_code == 428

    hist_body = c.get("/v1/templates/default/versions").json()
    assert [v["version"] for v in hist_body["versions"]] == [1, 2] and hist_body["active"] == 2
    assert "+Next item ID, please?" in c.get("/v1/templates/default/diff", params={"from": 1}).json()["diff"]
    assert c.post("/v1/templates/default/rollback").json()["version"] == 1
    again = oa.chat.completions.create(
        model="tiny-run", messages=[{"role": "user", "content": ""}], extra_body={"history": hist}
    )
    assert again.model_extra["template"]["version"] == 1
    assert c.post("/v1/templates/default/activate", json={"version": 2}).json()["version"] == 2
    c.post("/v1/templates/default/rollback")


def test_invalid_template_gets_422_with_line_and_column(api):
    c = http(api)
    etag = c.get("/v1/templates/default").headers["etag"]
    text = DEFAULT.replace("Next item ID?", "{{ history | nosuchfilter }}")
    r = c.put("/v1/templates/default", json={"text": text}, headers={"If-Match": etag})
    assert r.status_code == 422
    err = r.json()["error"]
    line = text.split("\n").index("{{ history | nosuchfilter }}") + 1
    assert (err["line"], err["column"], err["code"]) == (line, 14, "template_error")
    r = c.post("/v1/templates/default/preview", json={"text": "{% for x in history %}"})
    assert r.status_code == 422 and r.json()["error"]["line"] == 1
    r = c.post("/v1/templates/default/preview", json={"text": "{{ ''.__class__.__mro__ }}"})
    assert r.status_code == 422 and "unsafe" in r.json()["error"]["message"]
    assert c.get("/v1/templates/default").headers["etag"] == etag  # nothing saved


def test_writes_need_an_admin_key_and_names_cannot_traverse(api):
    reader = http(api, READER)
    assert reader.get("/v1/templates").status_code == 200
    r = reader.put("/v1/templates/new1", json={"text": "hi"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    assert httpx.put(api[0].url + "/v1/templates/new1", json={"text": "hi"}).status_code == 401
    c = http(api)
    for bad in ["..%2F..%2Fetc%2Fpasswd", "a%2Fb", ".hidden"]:
        assert c.get(f"/v1/templates/{bad}").status_code in (400, 404)
    assert c.get("/v1/templates/nope").status_code == 404
    created = c.put(
        "/v1/templates/brief",
        json={
            "text": "---\nname: brief\n---\n{% for it in history | recent(3) %}{{ it | format_item(2) }}\n{% endfor %}ID?"
        },
    )
    assert created.status_code == 201 and created.json()["version"] == 1
    assert c.put("/v1/templates/brief", json={"text": "x"}, headers={"If-None-Match": "*"}).status_code == 428


def test_editor_page_is_served_without_external_resources(api):
    c = http(api)
    page = c.get("/editor")
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    js = c.get("/editor/editor.js")
    assert js.status_code == 200 and "innerHTML" not in js.text  # everything shown goes through textContent
    assert c.get("/editor/..%2Fapp.py").status_code == 404


# -- CLI -----------------------------------------------------------------------------------------
def test_prompts_cli_new_render_validate_save_diff_rollback(tmp_path, run_copy):
    from typer.testing import CliRunner

    from genrec.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    shutil.copytree(
        run_copy.path, run, ignore=shutil.ignore_patterns("merged", "checkpoints", "base", "templates")
    )

    def cli(*args):
        result = runner.invoke(app, ["prompts", args[0], "--run", str(run), *args[1:]])
        return result

    listing = cli("list")
    assert listing.exit_code == 0 and "* default" in listing.output and "as trained" in listing.output
    assert cli("validate").exit_code == 0
    assert cli("new", "brief", "--from", "default", "-m", "shorter", "--author", "bob").exit_code == 0
    shown = cli("show", "brief")
    assert shown.exit_code == 0 and "name: brief" in shown.output
    rendered = cli("render", "brief", "--history", "I00001,I00002", "--json")
    assert rendered.exit_code == 0, rendered.output
    import json as _json

    msgs = _json.loads(rendered.output)
    assert msgs[-1]["role"] == "user" and msgs[-1]["content"].count("<") >= 2

    bad = tmp_path / "bad.jinja"
    bad.write_text("---\nname: brief\n---\nok\n{{ history | nosuch }}\n")
    v = cli("validate", "--file", str(bad))
    assert v.exit_code == 1 and f"{bad}:5:" in v.output
    # the location is said once, as FILE:LINE:COL
    assert v.output.count("line 5") == 0 and "nosuch" in v.output
    s = cli("save", "brief", "--file", str(bad))
    assert isinstance(s.exception, TemplateProblem) and "line 5" in str(s.exception)

    good = tmp_path / "good.jinja"
    good.write_text(
        "---\nname: brief\n---\n{% for it in history | recent(2) %}{{ it | format_item }}\n{% endfor %}Next?\n"
    )
    assert cli("save", "brief", "--file", str(good), "-m", "two items", "--author", "bob").exit_code == 0
    stale = cli("save", "brief", "--file", str(good), "--base", "1")
    assert isinstance(stale.exception, VersionConflict)
    d = cli("diff", "brief@v1", "brief")
    assert d.exit_code == 0 and "+{% endfor %}Next?" in d.output
    h = cli("history", "brief")
    assert h.exit_code == 0 and "* v2" in h.output and "two items" in h.output and "bob" in h.output
    assert "rolled back to v1" in cli("rollback", "brief").output
    assert "v2 is active" in cli("activate", "brief", "2").output


def test_a_request_admitted_before_a_save_keeps_its_version(api):
    """A request's template version is pinned when it is admitted: saved while the request waits for the engine
    (which renders it in its batch), a new version changes the next request only."""
    import asyncio

    from genrec.serve.service import Query

    _, rec = api
    service = RecService(rec, model_name="tiny-run")
    hist = rec.user_history(rec.data.users[2])[-3:]
    engine_free = threading.Event()
    rank_batch = service._rank_batch

    def held(requests):  # the engine is busy until the save below is done
        engine_free.wait(10)
        return rank_batch(requests)

    service._rank_batch = held

    async def scenario():
        await service.start()
        try:
            options = rec.cfg.ranking.with_(n_items=3)
            store = rec.templates
            admitted = store.active("default")
            q = Query(history=list(hist), options=options)
            waiting = asyncio.create_task(service.recommend(q))
            while service.queue_depth == 0:  # admitted and queued, not rendered yet
                await asyncio.sleep(0.005)
            assert q.messages is None and q.template.version == admitted.version
            text = store.text("default").replace("Next item ID", "Next item ID (in-flight test)")
            store.save("default", text, author="t", base_version=admitted.version)
            engine_free.set()
            recs = await waiting
            later = Query(history=list(hist), options=options)
            await service.recommend(later)
            store.rollback("default", by="t")
            return admitted, q, later, recs
        finally:
            engine_free.set()
            await service.stop()

    admitted, q, later, recs = asyncio.run(scenario())
    assert q.template.version == admitted.version and "(in-flight test)" not in q.messages[-1]["content"]
    assert later.template.version > admitted.version and "(in-flight test)" in later.messages[-1]["content"]
    assert len(recs) == 3


def test_a_save_by_another_process_is_seen_without_restart(tmp_path):
    """The server's store re-reads state.json when it changes (the CLI writes through its own store)."""
    server, cli = store_at(tmp_path), store_at(tmp_path)
    assert server.template("default")[0].version == 1
    cli.save("default", EDITED, author="cli", base_version=1)
    v, t = server.template("default")
    assert v.version == 2 and "(edited)" in t.body
    cli.rollback("default", by="cli")
    assert server.active("default").version == 1


# -- hardening (issue 29) ------------------------------------------------------------------------
def test_a_bad_name_is_a_400_on_every_route_with_or_without_if_match(api):
    c = http(api)
    etag = c.get("/v1/templates/default").headers["etag"]
    for method, route, body in [
        ("POST", "rollback", None),
        ("POST", "activate", {"version": 1}),
        ("POST", "preview", {}),
        ("PUT", "", {"text": "x"}),
    ]:
        for headers in ({}, {"If-Match": etag}, {"If-Match": "*"}):
            url = f"/v1/templates/a%20b/{route}".rstrip("/")
            r = c.request(method, url, json=body, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name", (
                method,
                route,
                r.text,
            )


def test_preview_needs_an_admin_key(api):
    r = http(api, READER).post("/v1/templates/default/preview", json={"text": "hi {{ user }}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    assert httpx.post(api[0].url + "/v1/templates/default/preview", json={}).status_code == 401


@pytest.mark.parametrize(
    ("front", "line", "column"),
    [
        ("variables: 5", 3, 12),
        ("variables: [[history]]", 3, 13),
        ("system: [a, b]", 3, 9),
        ("system: {a: 1}", 3, 9),
    ],
)
def test_front_matter_of_the_wrong_type_is_a_422_with_line_and_column(api, front, line, column):
    c = http(api)
    text = f"---\nname: typed\n{front}\n---\nhi"
    for r in (
        c.post("/v1/templates/typed/preview", json={"text": text}),
        c.put("/v1/templates/typed", json={"text": text}),
    ):
        assert r.status_code == 422, r.text
        assert (r.json()["error"]["line"], r.json()["error"]["column"]) == (line, column)


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1])


def test_hostile_template_corpus_over_http_is_refused_quickly_while_the_server_answers(api):
    """Every hostile template of tests/test_sandbox.py, previewed and saved over HTTP: each refused (422)
    within 3 s of wall time on a loaded 2-core machine (a render's own limit is 1 s, enforced by the worker
    and tested in tests/test_sandbox.py; the rest is HTTP, the preview's own work and CPU contention), the server process
    grows by under 64 MiB, and /health answers in well under a second while they run."""
    import os

    from genrec.templates.prompt_worker import shared_worker
    from tests.test_sandbox import HOSTILE

    c = http(api)
    etag = c.get("/v1/templates/default").headers["etag"]
    assert c.post("/v1/templates/default/preview", json={"n_items": 0}).status_code == 200  # worker started
    server_before = _rss_kib(os.getpid())
    stop, health = threading.Event(), []

    def watch() -> None:
        while not stop.is_set():
            t = time.monotonic()
            assert httpx.get(api[0].url + "/health", timeout=10).status_code == 200
            health.append(time.monotonic() - t)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for name, text in sorted(HOSTILE.items()):
            t = time.monotonic()
            r = c.post("/v1/templates/default/preview", json={"text": text, "n_items": 0})
            took = time.monotonic() - t
            assert r.status_code == 422, (name, r.text)
            assert took < 3.0, f"{name}: {took:.2f} s"
            worker = shared_worker()
            if worker._proc is not None and worker._proc.poll() is None:  # peak RSS since it started
                grew = _rss_kib(worker._proc.pid, "VmHWM") - worker.started_rss_kib
                assert grew < 64 * 1024, f"{name}: the render worker grew by {grew} KiB"
        for name in ("percent_star_width", "list_join_filter", "yaml_aliases", "int_square_loop"):
            r = c.put("/v1/templates/default", json={"text": HOSTILE[name]}, headers={"If-Match": etag})
            assert r.status_code == 422, (name, r.text)
    finally:
        stop.set()
        watcher.join(10)
    assert health and max(health) < 0.5, f"/health took up to {max(health):.2f} s"
    assert _rss_kib(os.getpid()) - server_before < 64 * 1024
    assert c.get("/v1/templates/default").headers["etag"] == etag  # nothing was saved


def test_prompts_validate_names_a_front_matter_type_error_as_file_line_col(tmp_path, run_copy):
    from typer.testing import CliRunner

    from genrec.cli import app

    bad = tmp_path / "typed.jinja"
    bad.write_text("---\nname: typed\nvariables: 5\n---\nhi\n")
    result = CliRunner().invoke(app, ["prompts", "validate", "--run", str(run_copy.path), "--file", str(bad)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # exit 1, no traceback
    assert f"{bad}:3:12: error: front-matter 'variables' must be a list" in result.output


def test_schemathesis_probe_over_every_route_with_and_without_keys_finds_no_5xx(trained_run, tmp_path):
    """bench.api_probe with a few cases per route, per key (none, reader, admin) and per generation mode
    (valid and schema-violating inputs), against a scratch copy of the run: no 5xx anywhere."""
    from bench.api_probe import ADMIN as PROBE_ADMIN
    from bench.api_probe import READER as PROBE_READER
    from bench.api_probe import probe

    run = tmp_path / "run"
    shutil.copytree(trained_run[0].path, run)
    rec = Recommender.load(RunDir(run), device="cpu")
    app = create_app(
        RecService(rec, model_name="tiny-run"), api_keys=[PROBE_READER], admin_keys={PROBE_ADMIN: "probe"}
    )
    with LiveServer(app) as s:
        out = probe(
            s.url,
            app.openapi(),
            auths={"none": None, "reader": PROBE_READER, "admin": PROBE_ADMIN},
            examples=3,
        )
    assert out["cases"] > 100 and out["5xx"] == 0, out["failures"]
    assert {"401", "400", "200"} <= set(out["statuses"])


# -- the hot path: checked versions render without the line trace (issue 26) ----------------------
def chat(api, template: str, history: list[str]) -> httpx.Response:
    return http(api, READER).post(
        "/v1/chat/completions",
        json={
            "model": "tiny-run",
            "messages": [{"role": "user", "content": ""}],
            "history": history,
            "template": template,
            "n_items": 3,
        },
    )


@pytest.fixture()
def line_traces(monkeypatch):
    """Counts the renders that ran under the sandbox's line trace (the server runs in this process)."""
    from genrec.templates import sandbox

    traces: list[object] = []
    real = sandbox._line_trace
    monkeypatch.setattr(sandbox, "_line_trace", lambda budget: traces.append(budget) or real(budget))
    return traces


def test_checked_versions_are_served_without_the_line_trace(api, line_traces):
    """A version saved through the API passed the sample-user check and says so; requests render it with ticks
    alone. One saved without a check (a script's own store.save) renders under the trace until an activation,
    which checks it first, and is then served as checked too."""
    _, rec = api
    c = http(api)
    listing = {t["name"]: t for t in c.get("/v1/templates").json()["data"]}
    assert listing["default"]["checked"] is True  # a shipped file: the operators'
    text = DEFAULT.replace("name: default", "name: hotpath")
    saved = c.put("/v1/templates/hotpath", json={"text": text})
    assert saved.status_code == 201 and saved.json()["checked"] is True
    hist = [rec.catalog.item_ids[i] for i in rec.user_history(rec.data.users[4])[-3:]]
    r = chat(api, "hotpath", hist)
    assert r.status_code == 200 and r.json()["template"]["version"] == 1, r.text
    assert line_traces == []

    unchecked = rec.templates.save("hotpath", text + "\n", author="script", base_version=1)
    assert unchecked.checked is False
    assert chat(api, "hotpath", hist).json()["template"]["version"] == 2
    assert line_traces  # its system and user messages, each under the trace
    c.post("/v1/templates/hotpath/activate", json={"version": 1})
    activated = c.post("/v1/templates/hotpath/activate", json={"version": 2})
    assert activated.status_code == 200 and activated.json()["checked"] is False  # as saved; checked now
    line_traces.clear()
    assert chat(api, "hotpath", hist).json()["template"]["version"] == 2
    assert line_traces == []


@pytest.mark.parametrize(
    ("name", "bomb"),
    [
        ("longloop", "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"),
        ("longflood", "{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}"),
    ],
)
def test_a_template_checked_on_the_sample_users_is_still_bounded_on_a_longer_history(api, name, bomb):
    """A template that is harmless for every sample user (the save check passes) and turns into a CPU or output
    bomb for a history longer than any of theirs: a request with such a history gets its 400 quickly, on the
    fast path, and the server goes on answering."""
    _, rec = api
    longest = max(len(s) for s in rec.data.sequences)
    text = f"---\nname: {name}\n---\n{{% if n_history_total > {longest} %}}{bomb}{{% endif %}}{{{{ user }}}}x"
    saved = http(api).put(f"/v1/templates/{name}", json={"text": text})
    assert saved.status_code == 201 and saved.json()["checked"] is True, saved.text
    ids = rec.catalog.item_ids
    assert chat(api, name, list(ids[:3])).status_code == 200
    start = time.monotonic()
    r = chat(api, name, [ids[k % len(ids)] for k in range(longest + 1)])
    took = time.monotonic() - start
    assert r.status_code == 400 and r.json()["error"]["code"] == "template_error", r.text
    assert took < 5.0, f"{took:.2f} s"
    assert httpx.get(api[0].url + "/health", timeout=5).status_code == 200


def test_a_template_that_fails_in_the_engine_batch_fails_its_own_request_only(api):
    """The engine's batch renders the prompts of the requests it ranks (with the versions pinned at admission): a
    request whose template fails to render gets its 400 (with the line), the others in the batch are ranked as
    if it had not been there."""
    from genrec.serve.service import Query

    _, rec = api
    longest = max(len(s) for s in rec.data.sequences)
    text = f"---\nname: failsome\n---\n{{% if n_history_total > {longest} %}}{{{{ nosuch.field }}}}{{% endif %}}x"
    assert http(api).put("/v1/templates/failsome", json={"text": text}).json()["checked"] is True
    service = RecService(rec, model_name="tiny-run")
    options = rec.cfg.ranking.with_(n_items=3)
    short = [rec.user_history(u)[-3:] for u in rec.data.users[:2]]
    too_long = [k % len(rec.catalog) for k in range(longest + 1)]
    queries = [Query(history=h, options=options) for h in (short[0], too_long, short[1])]
    for q in queries:
        service.pin(q, "failsome")
    out = service._rank_batch([service.rank_request(q) for q in queries])
    bad = out[1]
    assert isinstance(bad, APIError) and bad.status == 400 and bad.code == "template_error" and bad.line == 4
    alone = RecService(rec, model_name="tiny-run")
    for q, got in zip([queries[0], queries[2]], [out[0], out[2]], strict=True):
        again = Query(history=q.history, options=options)
        alone.pin(again, "failsome")
        assert [r.item for r in got] == [r.item for r in alone._rank_batch([alone.rank_request(again)])[0]]
