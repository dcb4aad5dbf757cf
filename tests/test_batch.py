"""Offline batch generation: rejects, sharding, and resuming a job killed with SIGKILL."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from genrec.batch import generate
from genrec.batch.input import REJECT_KINDS, parse_row
from genrec.config import RankingOptions
from genrec.errors import GenrecError
from genrec.recommender import Recommender


@pytest.fixture(scope="module")
def rec(trained_run):
    return Recommender.load(trained_run[0], device="cpu")


def interrupted_after_two_chunks(monkeypatch, rec, source, output, **opts):
    """A `generate` job stopped by Ctrl-C as it commits its third chunk: two chunks kept."""
    from genrec.batch.manifest import Manifest

    real_commit = Manifest.commit

    def crash_after_two(self, index, *args, **kw):
        if index >= 2:
            raise KeyboardInterrupt
        return real_commit(self, index, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(Manifest, "commit", crash_after_two)
        with pytest.raises(KeyboardInterrupt):
            generate(rec, source, output, **opts)


def write_input(rec, path, n=90):
    """n rows: known users, inline histories, and every kind of bad row, in a fixed order."""
    lines = []
    for i in range(n):
        u = rec.data.users[i % len(rec.data.users)]
        kind = i % 9
        if kind == 3:
            lines.append("{not json")
        elif kind == 5:
            lines.append(json.dumps({"history": ["no-such-item"]}))
        elif kind == 7:
            lines.append(json.dumps({"user": "stranger"}))
        elif kind == 8:
            lines.append(json.dumps({"history": []}))
        elif kind % 2:
            hist = [rec.catalog.item_ids[j] for j in rec.data.sequences[i % len(rec.data)][:3]]
            lines.append(json.dumps({"user": f"inline{i}", "history": hist}))
        else:
            lines.append(json.dumps({"user": u}))
    path.write_text("\n".join(lines) + "\n")
    good = {i + 1 for i in range(n) if i % 9 not in (3, 5, 7, 8)}
    return good


def test_generate_writes_rows_and_rejects(rec, tmp_path):
    good = write_input(rec, tmp_path / "users.jsonl")
    summary = generate(
        rec,
        tmp_path / "users.jsonl",
        tmp_path / "recs.jsonl",
        chunk_size=16,
        ranking=rec.cfg.ranking.with_(n_items=5),
        progress=False,
    )
    rows = [json.loads(x) for x in (tmp_path / "recs.jsonl").read_text().splitlines()]
    rejects = [json.loads(x) for x in (tmp_path / "recs.rejects.jsonl").read_text().splitlines()]
    assert {r["line"] for r in rows} == good and len(rows) == len(good) == summary["rows"]
    assert len(rejects) == 90 - len(good) == summary["rejects"]
    reasons = " ".join(r["reason"] for r in rejects)
    for what in ("malformed JSON", "unknown item(s): 'no-such-item'", "unknown user 'stranger'", "empty"):
        assert what in reasons
    kinds = {"malformed JSON": 10, "unknown items": 10, "unknown user": 10, "empty history": 10}
    assert summary["reject_kinds"] == kinds  # counted by kind at the end, and each reject says its kind
    assert set(kinds) <= set(REJECT_KINDS)
    assert {r["line"]: r["kind"] for r in rejects} == {
        i + 1: {3: "malformed JSON", 5: "unknown items", 7: "unknown user", 8: "empty history"}[i % 9]
        for i in range(90)
        if i + 1 not in good
    }
    for r in rows:
        assert len(r["items"]) == 5 and len({i["item_id"] for i in r["items"]}) == 5
        assert r["template_hash"] == rec.builder.template.hash and r["model"]
    with pytest.raises(GenrecError, match="--resume"):
        generate(rec, tmp_path / "users.jsonl", tmp_path / "recs.jsonl", progress=False)


def test_shards_partition_the_input_and_parquet_output(rec, tmp_path):
    good = write_input(rec, tmp_path / "users.jsonl", n=40)
    seen = []
    for k in range(3):
        generate(
            rec,
            tmp_path / "users.jsonl",
            tmp_path / f"s{k}.parquet",
            shard=(k, 3),
            chunk_size=7,
            ranking=rec.cfg.ranking.with_(n_items=3),
            progress=False,
        )
        seen += pd.read_parquet(tmp_path / f"s{k}.parquet")["line"].tolist()
    assert sorted(seen) == sorted(good)


def test_parquet_output_keeps_its_columns_across_chunks_without_users(rec, tmp_path):
    """A first chunk of history-only rows (no user) and later chunks with users; a Parquet input whose rows
    carry a date column the job does not read, one of them bad. Every Parquet output has the same columns, also with no accepted row."""
    hist = [rec.catalog.item_ids[j] for j in rec.data.sequences[0][:3]]
    n = 12
    pd.DataFrame(
        {
            "user": [None] * 4 + [rec.data.users[i] for i in range(4, n)],
            "history": [hist] * 4 + [None] * (n - 5) + [["no-such-item"]],
            "seen_at": pd.date_range("2026-01-01", periods=n, freq="D"),
        }
    ).to_parquet(tmp_path / "users.parquet")
    summary = generate(
        rec,
        tmp_path / "users.parquet",
        tmp_path / "recs.parquet",
        chunk_size=4,
        ranking=rec.cfg.ranking.with_(n_items=3),
        progress=False,
    )
    out = pd.read_parquet(tmp_path / "recs.parquet")
    assert summary["rows"] == n - 1 and out["line"].tolist() == list(range(1, n))
    assert out["user"].isna().tolist() == [True] * 4 + [False] * (n - 5)
    assert list(out.columns) == ["line", "user", "items", "template_hash", "model"]
    [reject] = [json.loads(x) for x in (tmp_path / "recs.rejects.jsonl").read_text().splitlines()]
    # only the columns a job reads are read (not seen_at): the reject shows those
    assert reject["line"] == n and "no-such-item" in reject["reason"]
    assert reject["raw"] == json.dumps({"user": rec.data.users[n - 1], "history": ["no-such-item"]})
    dated = parse_row(rec, 7, {"user": pd.Timestamp("2026-01-12").to_pydatetime(), "history": ["nope"]}, None)
    assert "2026-01-12" in dated.raw  # a Parquet user column of dates: the reject is written, not a crash

    (tmp_path / "bad.jsonl").write_text('{"user": "stranger"}\n')
    generate(rec, tmp_path / "bad.jsonl", tmp_path / "none.parquet", progress=False)
    empty = pd.read_parquet(tmp_path / "none.parquet")
    assert len(empty) == 0 and list(empty.columns) == list(out.columns)

    from genrec.batch.ray_backend import (
        merge_shards,  # the Ray backend's merge of shard outputs (no Ray needed)
    )

    merge_shards([tmp_path / "none.parquet", tmp_path / "recs.parquet"], tmp_path / "merged.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "merged.parquet"), out)
    merge_shards([tmp_path / "none.parquet"], tmp_path / "merged_none.parquet")
    assert list(pd.read_parquet(tmp_path / "merged_none.parquet").columns) == list(out.columns)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"chunk_size": -1}, "--chunk-size must be >= 1, got -1"),
    ],
)
def test_bad_options_are_named_before_any_input_is_read(rec, tmp_path, options, message):
    write_input(rec, tmp_path / "users.jsonl", n=3)
    with pytest.raises(GenrecError, match=re.escape(message)):
        generate(rec, tmp_path / "users.jsonl", tmp_path / "recs.jsonl", progress=False, **options)
    assert not (tmp_path / "recs.jsonl.parts").exists()
    pytest.importorskip("ray")
    from genrec.batch.ray_backend import generate_ray  # checked in the driver, before Ray starts

    with pytest.raises(GenrecError, match=re.escape(message)):
        generate_ray(rec.run.path, tmp_path / "users.jsonl", tmp_path / "ray.jsonl", workers=1, **options)


def test_resuming_refuses_an_input_that_changed_since_the_job_started(rec, tmp_path):
    """The manifest's chunks name input lines: a resumed job on a grown or edited input would skip or repeat rows."""
    users, out = tmp_path / "users.jsonl", tmp_path / "recs.jsonl"
    write_input(rec, users, n=20)
    # rows padded to 3 MB in all, so that an edit can sit beyond the first and last MiB
    padded = [
        json.dumps({**json.loads(x), "pad": "x" * 150_000}) if x.startswith('{"') else x
        for x in users.read_text().splitlines()
    ]
    users.write_text("\n".join(padded) + "\n")
    done = generate(rec, users, out, chunk_size=8, progress=False)
    assert generate(rec, users, out, resume=True, chunk_size=8, progress=False) == done  # unchanged: fine
    os.utime(users, (0, 0))  # touched (or restored from a copy): the same content resumes
    assert generate(rec, users, out, resume=True, chunk_size=8, progress=False) == done
    original = users.read_bytes()
    with open(users, "a") as f:
        f.write(json.dumps({"user": rec.data.users[0]}) + "\n")
    with pytest.raises(
        GenrecError, match=r"users.jsonl changed since this job started \(\d[\d,]* bytes then"
    ):
        generate(rec, users, out, resume=True, chunk_size=8, progress=False)
    # two lines in the middle swapped: same size, same first and last MiB, other rows at those line numbers
    lines = original.decode().splitlines(keepends=True)
    a, b = 9, 10
    assert (
        lines[a] != lines[b] and len("".join(lines[:a])) > 1 << 20 and len("".join(lines[b + 1 :])) > 1 << 20
    )
    lines[a], lines[b] = lines[b], lines[a]
    users.write_text("".join(lines))
    assert users.stat().st_size == len(original)
    with pytest.raises(
        GenrecError, match=r"changed since this job started \(same size \([\d,]+ bytes\), other"
    ):
        generate(rec, users, out, resume=True, chunk_size=8, progress=False)
    users.write_bytes(original)  # restored: resumes
    assert generate(rec, users, out, resume=True, chunk_size=8, progress=False) == done
    # manifests written before inputs were stamped, or stamped only at their ends, still resume
    manifest = tmp_path / "recs.jsonl.parts" / "manifest.json"
    data = json.loads(manifest.read_text())
    for old in ({}, {"input_ends_sha256": "0" * 64}):
        for k in ("input_size", "input_sha256"):
            data["settings"].pop(k, None)
        manifest.write_text(json.dumps({**data, "settings": {**data["settings"], **old}}))
        assert generate(rec, users, out, resume=True, chunk_size=8, progress=False) == done


def test_the_cli_counts_rejects_by_kind(trained_run, rec, tmp_path):
    """`genrec generate` ends with the rows ranked and the rejects by kind, most first; chunks a genrec from
    before kinds were recorded committed count as `not recorded`."""
    from typer.testing import CliRunner

    from genrec.batch.manifest import describe_rejects, reject_counts
    from genrec.cli import app

    known = [json.dumps({"user": u}) for u in rec.data.users[:2]]
    lines = [*known, json.dumps({"user": "stranger"})] * 3 + ["{oops", '{"history": []}', "[1]"]
    (tmp_path / "u.jsonl").write_text("\n".join(lines) + "\n")
    argv = [
        "generate",
        "--run",
        str(trained_run[0]),
        "-i",
        str(tmp_path / "u.jsonl"),
        "-o",
        str(tmp_path / "o.jsonl"),
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert (
        f"6 users ranked -> {tmp_path / 'o.jsonl'}; 6 rejected rows (3 unknown user, 1 malformed JSON, "
        f"1 empty history, 1 not a JSON object) -> {tmp_path / 'o.rejects.jsonl'}"
    ) in result.output
    old = [
        {"rows": 5, "rejects": 2},
        {"rows": 5, "rejects": 0},
        {"rows": 1, "rejects": 1, "reject_kinds": {"x": 1}},
    ]
    assert reject_counts(old) == {"not recorded": 2, "x": 1}
    assert describe_rejects({}) == ""


def test_a_line_that_is_not_utf8_is_rejected_and_a_broken_parquet_input_is_named(rec, tmp_path):
    """A byte that is not UTF-8 spoils one line, not the job; an input that is not Parquet is named."""
    user = rec.data.users[0]
    (tmp_path / "users.jsonl").write_bytes(
        f'{{"user": "{user}"}}\n{{"user": "caf\xe9"}}\n{{"user": "{user}"}}\n'.encode("latin-1")
    )
    summary = generate(
        rec,
        tmp_path / "users.jsonl",
        tmp_path / "recs.jsonl",
        ranking=rec.cfg.ranking.with_(n_items=3),
        progress=False,
    )
    assert summary["rows"] == 2 and summary["rejects"] == 1
    [reject] = [json.loads(x) for x in (tmp_path / "recs.rejects.jsonl").read_text().splitlines()]
    assert (
        reject["line"] == 2
        and reject["kind"] == "not UTF-8"
        and reject["reason"] == 'not UTF-8 text (byte 0xe9 at column 14): \'{"user": "caf\ufffd"}\''
    )
    (tmp_path / "users.parquet").write_text("not parquet")
    with pytest.raises(GenrecError, match=r"users.parquet: not a readable Parquet file"):
        generate(rec, tmp_path / "users.parquet", tmp_path / "out.jsonl", progress=False)


@pytest.mark.parametrize("prep_workers", [0, 2])
def test_kill_9_then_resume_gives_exactly_one_row_per_user(trained_run, rec, tmp_path, prep_workers):
    """Killed mid-run (with preparation workers too: they leave with the job, no orphans), then resumed."""
    import psutil

    run = trained_run[0]
    good = write_input(rec, tmp_path / "users.jsonl", n=180)
    out = tmp_path / "recs.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "genrec.cli",
        "generate",
        "--run",
        str(run),
        "--input",
        str(tmp_path / "users.jsonl"),
        "--output",
        str(out),
        "--chunk-size",
        "10",
        "--batch-size",
        "4",
        "-n",
        "5",
        "--prep-workers",
        str(prep_workers),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "recs.jsonl.parts" / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["chunks"]) >= 3:
            break
        assert proc.poll() is None, "generate finished before it could be killed; use a bigger input"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= prep_workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "preparation workers outlived the killed job"
    committed = len(json.loads(manifest.read_text())["chunks"])
    assert 3 <= committed < 18 and not out.exists()

    def resume():
        return generate(
            rec,
            tmp_path / "users.jsonl",
            out,
            resume=True,
            chunk_size=10,
            batch_size=4,
            ranking=rec.cfg.ranking.with_(n_items=5),
            progress=False,
        )

    summary = resume()
    lines = [json.loads(x)["line"] for x in out.read_text().splitlines()]
    assert sorted(lines) == sorted(good) and len(lines) == len(
        set(lines)
    )  # exactly one row per accepted user
    assert summary["rejects"] == 180 - len(good)
    assert resume()["rows"] == len(good)  # a finished job resumed again changes nothing


def test_rows_a_shard_or_a_resumed_job_passes_over_are_not_parsed(rec, tmp_path):
    """read_rows(keep=..., start=...) gives exactly the kept rows of a full read from `start` on, and never
    decodes the others: a bad line outside the shard is not this shard's reject. A Parquet input's other
    columns are not read; one with no column a job reads is named with the columns it has."""
    from genrec.batch.input import read_rows

    lines = [
        b'{"user": "a"}',
        b"{not json",
        b'{"user": "caf\xe9"}',
        b'{"user": "b"}',
        b"",
        b"[1]",
        b'{"user": "c"}',
    ]
    (tmp_path / "u.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    full = list(read_rows(tmp_path / "u.jsonl"))
    assert [(line, problem and problem.kind) for line, _, problem in full] == [
        (1, None), (2, "malformed JSON"), (3, "not UTF-8"), (4, None), (6, "not a JSON object"), (7, None)
    ]  # fmt: skip
    for keep in (lambda line: line % 3 == 1, lambda line: line > 3, lambda line: False, None):
        for start in (1, 3, 4, 8):
            assert list(read_rows(tmp_path / "u.jsonl", keep, start=start)) == [
                r for r in full if r[0] >= start and (keep is None or keep(r[0]))
            ]
    users = pd.DataFrame({"user": [f"u{i}" for i in range(10_000)], "segment": ["x"] * 10_000})
    users.to_parquet(tmp_path / "u.parquet", row_group_size=3000)
    full = list(read_rows(tmp_path / "u.parquet"))
    assert [line for line, _, _ in full] == list(range(1, 10_001)) and full[41][1] == {"user": "u41"}
    for keep in (lambda line: (line - 1) % 3 == 2, lambda line: line > 8190, lambda line: line == 4097, None):
        for start in (1, 3000, 3001, 6002, 10_000, 10_001):
            assert list(read_rows(tmp_path / "u.parquet", keep, start=start)) == [
                r for r in full if r[0] >= start and (keep is None or keep(r[0]))
            ]
    users.rename(columns={"user": "customer"}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(
        GenrecError,
        match=r"bad.parquet: no column 'user', 'user_id', 'history', 'text' \(it has customer, segment",
    ):
        next(read_rows(tmp_path / "bad.parquet"))
    for bad, message in (
        ("bad.parquet", "no column 'user'"),
        ("users.csv", r"input must be \.jsonl \(or \.jsonl\.gz\) or \.parquet"),
    ):
        (tmp_path / "users.csv").write_text("user\nu1\n")
        with pytest.raises(GenrecError, match=f"{bad}: {message}"):  # refused before the job starts
            generate(rec, tmp_path / bad, tmp_path / "out.jsonl", progress=False)
        assert not (tmp_path / "out.jsonl.parts").exists()


def test_count_rows_without_parsing(tmp_path):
    from genrec.batch.input import count_rows

    (tmp_path / "a.jsonl").write_text('{"user": "a"}\n{"user": "b"}\n{"user": "c"}')  # no final newline
    (tmp_path / "b.jsonl").write_text('{"user": "a"}\n')
    pd.DataFrame({"user": ["a", "b"]}).to_parquet(tmp_path / "c.parquet")
    assert [count_rows(tmp_path / f) for f in ("a.jsonl", "b.jsonl", "c.parquet")] == [3, 1, 2]


def test_a_resumed_job_keeps_the_template_version_it_started_with(trained_run, tmp_path, monkeypatch, caplog):
    """A template activated between the crash and --resume does not mix two prompts in one output.
    The interrupted job says what it kept and how to go on."""
    import shutil

    from genrec.batch.manifest import Manifest
    from genrec.run import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(trained_run[0].path, run.path, ignore=shutil.ignore_patterns("checkpoints", "templates"))
    rec = Recommender.load(run, device="cpu")
    write_input(rec, tmp_path / "users.jsonl", n=36)
    started_hash = rec.builder.template.hash
    real_commit = Manifest.commit

    def crash_after_first(self, index, *args, **kw):
        if index >= 1:
            raise KeyboardInterrupt("simulated crash")
        return real_commit(self, index, *args, **kw)

    monkeypatch.setattr(Manifest, "commit", crash_after_first)
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING, logger="genrec.batch"):
        generate(
            rec,
            tmp_path / "users.jsonl",
            tmp_path / "recs.jsonl",
            chunk_size=12,
            ranking=rec.cfg.ranking.with_(n_items=3),
            progress=False,
        )
    monkeypatch.undo()
    assert (
        f"generate interrupted: 12 input rows done in 1 committed chunk(s) ({tmp_path / 'recs.jsonl.parts'}, up to "
        "input line 12); the same command with --resume goes on from there" in caplog.messages
    )
    text = rec.templates.text("default").replace("Next item ID?", "Next?")
    rec.templates.save("default", text, author="t", base_version=1)
    assert rec.builder.template.hash != started_hash  # new requests would use the new version
    generate(
        rec,
        tmp_path / "users.jsonl",
        tmp_path / "recs.jsonl",
        chunk_size=12,
        ranking=rec.cfg.ranking.with_(n_items=3),
        resume=True,
        progress=False,
    )
    rows = [json.loads(x) for x in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert rows and {r["template_hash"] for r in rows} == {started_hash}


def test_ray_backend_in_local_mode_gives_one_row_per_user_in_input_order(
    trained_run, rec, tmp_path, monkeypatch, caplog
):
    """Two Ray tasks each rank a shard; the merged output equals the single-process run's rows. The driver
    interrupted once shards have committed chunks says so, and --resume finishes the job."""
    pytest.importorskip("ray")
    from genrec.batch import ray_backend as batch_ray
    from genrec.batch.ray_backend import generate_ray

    good = write_input(rec, tmp_path / "users.jsonl", n=180)
    args = (trained_run[0].path, tmp_path / "users.jsonl", tmp_path / "recs.jsonl")
    opts = {
        "workers": 2,
        "chunk_size": 8,
        "ranking": rec.cfg.ranking.with_(n_items=3),
        "engine": "hf",
        "device": "cpu",
    }

    def ctrl_c_once_chunks_are_committed(ray, refs, outs, *, total, progress):
        deadline = time.time() + 180
        while sum(batch_ray._committed(o) for o in outs) < 8 and time.time() < deadline:
            time.sleep(0.1)
        raise KeyboardInterrupt

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="genrec.batch.ray_backend"):
        m.setattr(batch_ray, "_wait_with_progress", ctrl_c_once_chunks_are_committed)
        with pytest.raises(KeyboardInterrupt):
            generate_ray(*args, **opts)
    done = re.search(r"generate \(ray\) interrupted: (\d+) input rows done", caplog.text)
    assert done and 8 <= int(done[1]) < 180 and "--resume goes on from there" in caplog.text
    assert not (tmp_path / "recs.jsonl").exists()
    summary = generate_ray(*args, resume=True, **opts)
    rows = [json.loads(x) for x in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == sorted(good) and summary["rows"] == len(good)
    rejects = [json.loads(x) for x in (tmp_path / "recs.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == sorted(set(range(1, 181)) - good) == [r["line"] for r in rejects]
    assert not (tmp_path / "recs.jsonl.shards").exists()
    single = generate(
        rec,
        tmp_path / "users.jsonl",
        tmp_path / "one.jsonl",
        chunk_size=8,
        ranking=rec.cfg.ranking.with_(n_items=3),
        progress=False,
    )
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [[i["item_id"] for i in r["items"]] for r in rows] == [
        [i["item_id"] for i in r["items"]] for r in one
    ]
    assert single["rows"] == summary["rows"] and single["reject_kinds"] == summary["reject_kinds"]
    assert sum(summary["reject_kinds"].values()) == summary["rejects"] == 180 - len(good)


def test_preparation_workers_give_the_same_output(trained_run, rec, tmp_path):
    """--prep-workers: prompts and retrieval in 2 spawned processes, several batches ahead across small
    chunks; rows, scores and rejects equal the in-process job's. A worker's error reaches the caller."""
    from genrec.prep import PrepPool
    from genrec.recommender import RankRequest
    from genrec.templates.prompt_store import TemplateNotFound

    good = write_input(rec, tmp_path / "users.jsonl", n=60)
    for mode in ("all", "retriever"):
        outs = []
        for workers in (0, 2):
            out = tmp_path / f"{mode}{workers}.jsonl"
            generate(
                rec,
                tmp_path / "users.jsonl",
                out,
                chunk_size=7,
                batch_size=3,
                ranking=RankingOptions(n_items=4, candidates=mode, n_candidates=20),
                progress=False,
                workers=workers,
            )
            outs.append((out.read_text(), out.with_name(out.stem + ".rejects.jsonl").read_text()))
        assert outs[0] == outs[1] and outs[0][0].count("\n") == len(good)
    with PrepPool(str(trained_run[0]), 1) as pool:
        bad = pool.submit([RankRequest([0, 1], template="no-such-template")])
        with pytest.raises(TemplateNotFound, match="no-such-template"):
            bad.result()
        good = pool.submit([RankRequest([0, 1], options=RankingOptions(candidates="all"))]).result()
        assert good.prompts == [rec.engine.encode_many([rec.builder.messages([0, 1], None)])[0]]
        assert good.retrieved == [None] and good.layouts is None  # no layout policy given
        if importlib.util.find_spec("faiss"):  # one search thread per worker, as torch's
            import faiss

            assert pool._pool.submit(faiss.omp_get_max_threads).result() == 1


def test_evaluation_ranking_with_preparation_workers_is_the_same(rec):
    """`eval.prep_workers`: evaluate's genrec lists, prepared by 2 worker processes, equal the in-process ones."""
    import dataclasses

    from genrec.data import leave_one_out
    from genrec.prep import model_lists

    examples = leave_one_out(rec.data, "test")[:40]
    cfg = dataclasses.replace(
        rec.cfg, eval=dataclasses.replace(rec.cfg.eval, candidates="retriever", n_candidates=30, batch_size=7)
    )
    alone = model_lists(rec, examples, cfg, progress=False)
    assert len(alone) == 40 and all(alone)
    assert model_lists(rec, examples, cfg, progress=False, workers=2) == alone


def test_rank_stream_launches_the_next_batch_before_reading_one(rec, monkeypatch):
    """`Recommender.rank_stream` (how the batch job and `evaluate` rank) keeps one batch launched ahead: batch
    i + 1 is started before batch i is read back, so a GPU ranks while the job writes and packs. The results
    equal `rank_prepared`'s, and a request with a tree layout (a worker's, or one the recommender made) reaches the engine without a
    trie."""
    from genrec.data import leave_one_out
    from genrec.engines.hf import tree_layouts
    from genrec.recommender import history_requests

    examples = leave_one_out(rec.data, "test")[:12]
    batches = [
        history_requests(
            [e.history for e in examples[s : s + 4]],
            options=RankingOptions(n_items=5, candidates=mode, n_candidates=25),
        )
        for s, mode in ((0, "retriever"), (4, "all"), (8, "retriever"))
    ]
    prepared = [rec.prepare(reqs) for reqs in batches]
    for reqs, p in zip(batches[:2], prepared[:2], strict=True):  # as a worker does; the third has none
        found = tree_layouts(rec.prepared_tries(reqs, p), *rec.engine.layout_policy)
        p.layouts = [found.get(i) for i in range(len(reqs))]
    assert prepared[0].layouts is not None and all(prepared[0].layouts)
    want = [rec.rank_prepared(reqs, p) for reqs, p in zip(batches, prepared, strict=True)]

    events: list[tuple[str, int]] = []
    no_trie: list[list[bool]] = []
    launch = rec.engine.launch

    def spy(prompts, tries, **kw):
        i = len(no_trie)
        events.append(("launch", i))
        no_trie.append([t is None for t in tries])
        result = launch(prompts, tries, **kw)
        return lambda: events.append(("read", i)) or result()

    monkeypatch.setattr(rec.engine, "launch", spy)
    got = list(
        rec.rank_stream((k, reqs, p) for k, (reqs, p) in enumerate(zip(batches, prepared, strict=True)))
    )
    assert events == [("launch", 0), ("launch", 1), ("read", 0), ("launch", 2), ("read", 1), ("read", 2)]
    assert [tag for tag, _, _ in got] == [0, 1, 2]
    for (_, _, ranked), expected in zip(got, want, strict=True):
        assert [[(x.item, round(x.score, 4)) for x in r] for r in ranked] == [
            [(x.item, round(x.score, 4)) for x in r] for r in expected
        ]
    for flags, reqs, p in zip(no_trie, batches, prepared, strict=True):
        lays = p.layouts
        if lays is None:  # made by the recommender under the engine's policy (issue 26: timed as `layout`)
            found = tree_layouts(rec.prepared_tries(reqs, p), *rec.engine.layout_policy)
            lays = [found.get(i) for i in range(len(reqs))]
        assert flags == [lay is not None for lay in lays]
    assert list(rec.rank_stream(iter([]))) == []


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_folder_of_part_files_is_one_input(rec, tmp_path, monkeypatch, fmt):
    """A Spark/Hive export: part files in name order, lines counted across them; '_SUCCESS' and hidden files
    are not data. Same rows as the parts joined in one file, rejects name their part and line, a crash
    resumes across parts, and a renamed part is a changed input."""

    write_input(rec, tmp_path / "all.jsonl", n=36)
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    folder = tmp_path / "users"
    folder.mkdir()
    for i, (lo, hi) in enumerate([(0, 10), (10, 11), (11, 25), (25, 36)]):
        part = folder / f"part-{i:05d}.{fmt}"
        if fmt == "jsonl":
            part.write_text("".join(x + "\n" for x in lines[lo:hi]))
        else:  # parseable rows only: a Parquet file has no malformed line
            rows = [json.loads(x) if x.startswith('{"') else {"user": None} for x in lines[lo:hi]]
            pd.DataFrame(
                {"user": [r.get("user") for r in rows], "history": [r.get("history") for r in rows]}
            ).to_parquet(part)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00000.crc").write_text("x")
    joined = tmp_path / f"joined.{fmt}"
    if fmt == "jsonl":
        joined.write_text("".join(p.read_text() for p in sorted(folder.glob("part-*"))))
    else:
        pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("part-*"))]).to_parquet(joined)
    opts = {"chunk_size": 8, "ranking": rec.cfg.ranking.with_(n_items=3), "progress": False}
    one = generate(rec, joined, tmp_path / "one.jsonl", **opts)
    interrupted_after_two_chunks(monkeypatch, rec, folder, tmp_path / "recs.jsonl", **opts)
    assert generate(rec, folder, tmp_path / "recs.jsonl", resume=True, **opts) == {
        **one,
        "output": str(tmp_path / "recs.jsonl"),
        "rejects_file": str(tmp_path / "recs.rejects.jsonl"),
    }
    assert (tmp_path / "recs.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    rejects = [json.loads(x) for x in (tmp_path / "recs.rejects.jsonl").read_text().splitlines()]
    where = {r["line"]: r["source"] for r in rejects}
    assert where[4] == f"part-00000.{fmt} line 4" and where[27] == f"part-00003.{fmt} line 2"
    assert [{k: v for k, v in r.items() if k != "source"} for r in rejects] == [
        json.loads(x) for x in (tmp_path / "one.rejects.jsonl").read_text().splitlines()
    ]
    (folder / f"part-00001.{fmt}").rename(folder / f"part-00001b.{fmt}")  # same bytes, another name
    with pytest.raises(GenrecError, match="changed since this job started"):
        generate(rec, folder, tmp_path / "recs.jsonl", resume=True, **opts)

    (folder / "notes.txt").write_text("x")
    with pytest.raises(
        GenrecError,
        match=r"a folder input holds part files of one format.*\(found: \.(json|parquet)l?, \.txt",
    ):
        generate(rec, folder, tmp_path / "other.jsonl", **opts)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenrecError, match=r"found: no data file"):
        generate(rec, tmp_path / "empty", tmp_path / "other.jsonl", **opts)


def test_a_gzipped_jsonl_input_is_read_as_it_decompresses(rec, tmp_path, monkeypatch):
    """`users.jsonl.gz` (two gzip members, as `cat a.gz b.gz` makes) gives the rows and rejects of the plain
    file; its stamp is the hash of the bytes as stored; a crash resumes on it; a Spark folder of
    `part-*.json.gz` parts reads the same; a file cut short or damaged is refused before any work, naming it
    and the line where its data ends; a gzipped Parquet file is not an input."""
    import gzip
    import hashlib

    write_input(rec, tmp_path / "users.jsonl", n=36)
    data = (tmp_path / "users.jsonl").read_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    gz = tmp_path / "users.jsonl.gz"
    gz.write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]))
    opts = {"chunk_size": 8, "ranking": rec.cfg.ranking.with_(n_items=3), "progress": False}
    plain = generate(rec, tmp_path / "users.jsonl", tmp_path / "plain.jsonl", **opts)
    interrupted_after_two_chunks(monkeypatch, rec, gz, tmp_path / "recs.jsonl", **opts)
    stamp = json.loads((tmp_path / "recs.jsonl.parts" / "manifest.json").read_text())["settings"]
    assert stamp["input_sha256"] == hashlib.sha256(gz.read_bytes()).hexdigest()
    assert stamp["input_size"] == gz.stat().st_size
    summary = generate(rec, gz, tmp_path / "recs.jsonl", resume=True, **opts)
    assert summary["rows"] == plain["rows"] and summary["rejects"] == plain["rejects"] > 0
    assert (tmp_path / "recs.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()
    assert (tmp_path / "recs.rejects.jsonl").read_text() == (tmp_path / "plain.rejects.jsonl").read_text()

    spark = tmp_path / "spark"
    spark.mkdir()
    (spark / "part-00000-c000.json.gz").write_bytes(gzip.compress(data[:cut]))
    (spark / "part-00001-c000.json.gz").write_bytes(gzip.compress(data[cut:]))
    (spark / "_SUCCESS").write_text("")
    generate(rec, spark, tmp_path / "spark.jsonl", **opts)
    assert (tmp_path / "spark.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()

    whole = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        GenrecError, match=r"cut\.jsonl\.gz.*gzip data ends early \(cut short\?\) after line \d+"
    ):
        generate(rec, tmp_path / "cut.jsonl.gz", tmp_path / "out.jsonl", **opts)
    assert not (tmp_path / "out.jsonl.parts").exists()
    damaged = bytearray(whole)
    damaged[-8] ^= 0xFF  # the stored CRC-32 no longer matches the data
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(damaged))
    with pytest.raises(GenrecError, match=r"bad\.jsonl\.gz.*gzip data is damaged \(CRC check failed"):
        generate(rec, tmp_path / "bad.jsonl.gz", tmp_path / "out.jsonl", **opts)
    (tmp_path / "users.parquet.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(
        GenrecError, match=r"users\.parquet\.gz: input must be \.jsonl \(or \.jsonl\.gz\) or \.parquet"
    ):
        generate(rec, tmp_path / "users.parquet.gz", tmp_path / "out.jsonl", **opts)


def test_generate_rows_with_text_put_it_in_the_prompt(rec, tmp_path, monkeypatch):
    """A row's `text` is the user's request: with a history (or a known user) both reach the prompt (the need
    template); alone, it is a new user's request; a non-string text is a reject."""
    hist = [rec.catalog.item_ids[j] for j in rec.data.sequences[0][:3]]
    rows = [
        {"user": rec.data.users[1], "text": "something for a long train ride"},
        {"history": hist, "text": "a present for my sister"},
        {"text": "board games for four players"},
        {"history": hist, "text": 5},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sent: list = []
    encode = rec.engine.encode_many
    monkeypatch.setattr(rec.engine, "encode_many", lambda msgs: sent.extend(msgs) or encode(msgs))
    summary = generate(
        rec,
        tmp_path / "in.jsonl",
        tmp_path / "out.jsonl",
        ranking=rec.cfg.ranking.with_(n_items=3),
        progress=False,
    )
    assert summary["rows"] == 3 and summary["reject_kinds"] == {"text not a string": 1}
    prompts = ["\n".join(m["content"] for m in msgs) for msgs in sent]
    for text in (
        "something for a long train ride",
        "a present for my sister",
        "board games for four players",
    ):
        assert any(text in p for p in prompts)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in out] == [1, 2, 3]


# -- hardening (issue 29): one job per output, no temp file left behind, unwritable outputs named ---------
def test_a_second_job_on_the_same_output_is_refused_and_the_first_finishes(rec, tmp_path, monkeypatch):
    """`--resume` started while the first run is still going used to finalise under it (FileNotFoundError,
    a manifest stuck at done: false). Now the second job is refused at once, naming the first."""
    import threading

    from genrec.batch.manifest import Manifest

    good = write_input(rec, tmp_path / "users.jsonl", n=60)
    out = tmp_path / "recs.jsonl"
    committed, release = threading.Event(), threading.Event()
    real_commit = Manifest.commit

    def slow_commit(self, index, *args, **kw):
        real_commit(self, index, *args, **kw)
        if index == 0:
            committed.set()
            assert release.wait(60)

    monkeypatch.setattr(Manifest, "commit", slow_commit)
    first: dict = {}
    job = threading.Thread(
        target=lambda: first.update(
            generate(rec, tmp_path / "users.jsonl", out, chunk_size=16, progress=False)
        )
    )
    job.start()
    try:
        assert committed.wait(60)
        for resume in (True, False):
            with pytest.raises(
                GenrecError, match=rf"being written by another genrec job \(pid {os.getpid()}, started"
            ):
                generate(rec, tmp_path / "users.jsonl", out, chunk_size=16, resume=resume, progress=False)
    finally:
        release.set()
        job.join(60)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert first["rows"] == len(rows) == len(good) and {r["line"] for r in rows} == good
    again = generate(rec, tmp_path / "users.jsonl", out, chunk_size=16, resume=True, progress=False)
    assert again["rows"] == len(good)  # the lock went with the first job


@pytest.mark.parametrize("fail_at", [1, 3, 7])
def test_a_failed_write_leaves_no_temp_file_and_names_the_path(rec, tmp_path, monkeypatch, fail_at):
    """A full disk at any commit (parts, manifest, final output): a GenrecError naming the file, no temp file
    anywhere, and --resume then finishes with one row per input row."""
    import errno

    good = write_input(rec, tmp_path / "users.jsonl", n=60)
    out = tmp_path / "recs.jsonl"
    real_fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_disk)
        with pytest.raises(GenrecError, match=r"cannot write .*No space left on device.*--resume"):
            generate(rec, tmp_path / "users.jsonl", out, chunk_size=16, progress=False)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    generate(rec, tmp_path / "users.jsonl", out, chunk_size=16, resume=True, progress=False)
    assert {json.loads(x)["line"] for x in out.read_text().splitlines()} == good


def test_atomic_file_removes_its_temp_file_on_any_error(tmp_path):
    from genrec.run import atomic_file

    target = tmp_path / "x.txt"
    target.write_text("before")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_an_unwritable_output_is_named_not_a_traceback(rec, tmp_path):
    write_input(rec, tmp_path / "users.jsonl", n=10)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(GenrecError, match=r"cannot write .*afile"):
        generate(rec, tmp_path / "users.jsonl", tmp_path / "afile" / "recs.jsonl", progress=False)
