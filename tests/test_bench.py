"""The benchmark scripts' own logic (not their figures): exports, skips, tables."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import bench.quality as quality
import bench.recbole_peer as peer


def test_recbole_export_keeps_every_sequence_in_order(small_data, tmp_path):
    folder = peer.export_atomic(small_data, tmp_path, "x")
    lines = (folder / "x.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = [ln.split("\t") for ln in lines[1:]]
    assert len(rows) == small_data.n_interactions
    by_user: dict[str, list[tuple[float, str]]] = {}
    for u, i, t in rows:
        by_user.setdefault(u, []).append((float(t), i))
    for user, seq in zip(small_data.users, small_data.sequences, strict=True):
        assert [i for _, i in sorted(by_user[user])] == [small_data.catalog.item_ids[k] for k in seq]


def test_recbole_config_uses_the_issue_protocol(tmp_path):
    cfg = peer.recbole_config(tmp_path, "x", epochs=10, sizes=peer.SIZES)
    assert cfg["loss_type"] == "CE" and cfg["train_neg_sample_args"] is None
    assert cfg["eval_args"]["split"] == {"LS": "valid_and_test"} and cfg["eval_args"]["order"] == "TO"
    assert cfg["eval_args"]["mode"] == "full"
    assert cfg["eval_step"] == 1 and cfg["stopping_step"] == 10  # RecBole's own early stopping, every epoch


def test_recbole_run_keeps_its_epoch_log_when_it_fails(tmp_path, monkeypatch):
    """A RecBole run that dies (or runs out of time) still leaves its per-epoch log beside the results."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nmkdir -p log/SASRec && echo 'epoch 0 training' > log/SASRec/a.log\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(peer, "RECBOLE_PY", fake)
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "out" / "peer.recbole.log"
    with pytest.raises(RuntimeError, match="exit 3"):
        peer.run_recbole({"data_path": str(data)}, 30, log=log)
    assert log.read_text() == "epoch 0 training\n"


def test_quality_skips_cleanly_without_shared_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "SHARED", tmp_path / "absent")
    assert (
        quality.main(["--datasets", "beauty", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
        == 0
    )
    out = capsys.readouterr().out
    assert "skipped" in out and "nothing measured" in out and not (tmp_path / "o").exists()


def test_quality_table_puts_published_figures_beside_ours():
    out = {
        "dataset": "beauty",
        "users": 10,
        "items": 5,
        "results": {"genrec": {"recall@10": 0.07, "ndcg@10": 0.04}},
        "published": quality.DATASETS["beauty"][2],
    }
    t = quality.table(out)
    assert (
        "| genrec | 0.0700 | 0.0400 |" in t
        and "*TIGER (Rajput et al. 2023), published* | 0.0648 | 0.0384 |" in t
    )


def test_recbole_results_are_read_back_from_its_log():
    log = (
        "Sun 22 Nov 2026 15:33:55 INFO  epoch 6 training [time: 150.37s, train loss: 1051.9013]\n"
        "Sun 22 Nov 2026 15:37:18 INFO  best valid : OrderedDict([('recall@10', 0.141), ('ndcg@10', 0.0624)])\n"
        "Sun 22 Nov 2026 15:37:18 INFO  test result: OrderedDict([('recall@10', 0.1304), ('ndcg@10', 0.0589)])\n"
    )
    out = peer.parse_recbole_log(log)
    assert out["test_result"] == {"recall@10": 0.1304, "ndcg@10": 0.0589}
    assert out["best_valid_result"]["ndcg@10"] == 0.0624 and out["epochs_run"] == 7


def test_recbole_peer_compares_a_stored_log_with_a_stored_genrec_result(
    small_data, tmp_path, monkeypatch, capsys
):
    """--from-recbole-log with --genrec-result trains nothing: both sides come from files, ratio computed."""
    import json

    import genrec.data

    (tmp_path / "ml-100k").mkdir()
    monkeypatch.setattr(peer, "SHARED", tmp_path)
    monkeypatch.setattr(peer, "RECBOLE_PY", Path(peer.__file__))  # exists; never run
    monkeypatch.setattr(genrec.data, "load_dataset", lambda cfg: small_data)
    monkeypatch.setattr(peer, "genrec_sasrec", lambda *a, **k: pytest.fail("genrec's side was trained"))
    log = tmp_path / "rb.log"
    log.write_text(
        "x INFO  epoch 29 training [time: 1s, train loss: 1.0]\n"
        "x INFO  best valid : OrderedDict([('ndcg@10', 0.09)])\n"
        "x INFO  test result: OrderedDict([('recall@10', 0.17), ('ndcg@10', 0.08)])\n"
    )
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"genrec": {"config": {"epochs": 500}, "test_result": {"ndcg@10": 0.088}}}))
    out = tmp_path / "peer.json"
    argv = ["--from-recbole-log", str(log), "--genrec-result", str(ours), "--out", str(out)]
    assert peer.main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["recbole"]["epochs_run"] == 30 and saved["genrec"]["from"] == str(ours)
    assert saved["ndcg@10_ratio"] == pytest.approx(1.1)
    assert "| genrec SASRec (CE) | nan | 0.0880 |" in capsys.readouterr().out


def test_recbole_peer_trains_genrec_sasrec_with_recboles_stopping_rule(small_data):
    """--genrec-eval-every / --genrec-patience reach SASRecConfig (None keeps its default)."""
    metrics, cfg = peer.genrec_sasrec(small_data, epochs=3, eval_every=1, patience=1, lr=None)
    assert (cfg["epochs"], cfg["eval_every"], cfg["patience"], cfg["lr"]) == (3, 1, 1, 3e-3)
    assert set(metrics) >= {"recall@10", "ndcg@10", "ndcg@20"} and 0 <= metrics["ndcg@10"] <= 1


def test_search_overhead_free_model_keeps_the_search_exact(trained_run):
    """The benchmark's zero-cost model still drives a real search: valid, distinct, within the tries."""
    import bench.search_overhead as so
    from genrec.config import RankingOptions
    from genrec.decoding import constrained_beam_search
    from genrec.recommender import RankRequest, Recommender

    run, _, _ = trained_run
    rec = Recommender.load(run, device="cpu")
    hist = [rec.user_history(u) for u in rec.data.users[:5]]
    tries = [
        rec.candidate_trie(RankRequest(h, options=RankingOptions(n_items=5, candidates="all"))) for h in hist
    ]
    out = constrained_beam_search(so.FreeModel(), [[0]] * 5, tries, beam_width=5)
    for ranked, h in zip(out, hist, strict=True):
        assert len(ranked.items) == 5 == len(set(ranked.items)) and not set(ranked.items) & set(h)
        assert ranked.scores == sorted(ranked.scores, reverse=True)


def test_engine_throughput_runs_the_tree_path_and_greedy_reference(trained_run, tmp_path, monkeypatch):
    """bench.engine_throughput on the transformers engine: exact tree scoring over retrieved candidates,
    and the greedy reference it is compared with; greedy matches a plain argmax loop (left padding
    changes nothing)."""
    import json
    import sys

    import torch

    import bench.engine_throughput as et
    from genrec.recommender import Recommender

    run, _, _ = trained_run
    out = tmp_path / "engine.json"
    argv = ["x", "--run", str(run.path), "--engine", "hf", "--users", "12", "--batch", "6"]
    argv += [
        "--candidates",
        "retriever",
        "--n-candidates",
        "30",
        "--search",
        "exact",
        "--latency-requests",
        "3",
        "--prep-workers",
        "1",
        "--profile",
        "--id-softmax",
        "level",  # forced on a model trained with the vocabulary softmax: a speed test's setting
    ]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    et.main()
    res = json.loads(out.read_text())
    assert res["search"] == "exact" and res["constrained_users_per_s"] > 0 and res["greedy_users_per_s"] > 0
    assert res["id_softmax"] == "level"
    assert res["greedy_with_prompts_users_per_s"] > 0
    # with a preparation worker: the ranking process's wall time split, and one profiled pass (CPU: no GPU figure)
    split = res["ranking_process_prep_workers"]
    assert split["ranking_s"] > 0 and split["waiting_for_workers_s"] >= 0 and split["profiled_s"] > 0
    assert "gpu_busy_fraction" not in split and res["constrained_users_per_s_prep_workers"] > 0
    assert "Self CPU" in out.with_suffix(".profile.txt").read_text()
    assert res["latency_ratio_p50"] > 0

    engine = Recommender.load(run, device="cpu").engine
    prompts = [
        engine.encode_messages([{"role": "user", "content": t}]) for t in ("a", "a longer prompt here")
    ]
    batched = engine.greedy(prompts, max_tokens=3)
    for p, got in zip(prompts, batched, strict=True):
        ids = list(p)
        for _ in range(3):  # min_new_tokens: end-of-sequence is never picked before the last token
            with torch.no_grad():
                logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
            logits[engine.tokenizer.eos_token_id] = -float("inf")
            ids.append(int(logits.argmax()))
        assert got == ids[len(p) :]


def test_id_init_probe_layouts_and_a_short_run(tmp_path):
    """The probe's prompt layouts (what its figures rest on), then one epoch end to end on a generated run."""
    import argparse

    import bench.id_init_probe as probe
    from tests.conftest import make_run

    fmt = argparse.Namespace(fmt=True, suffix=3, hist_loss=True, all_pos=False, maxlen=20)
    toks, at = probe.prompt([100, 101], fmt)
    assert toks == [*probe.PREFIX, 100, probe.SEP, 101, probe.SEP, 15, 16, 17] and at == [12, 14]
    rows = probe.training_rows([[0, 1, 2, 3, 4]], fmt)  # the last two items are validation and test
    assert rows == [([*probe.PREFIX, 40, probe.SEP, 41, probe.SEP, 15, 16, 17, 42], [14, 19])]
    plain = argparse.Namespace(fmt=False, hist_loss=False, all_pos=False, maxlen=20)
    assert probe.training_rows([[0, 1, 2, 3, 4]], plain) == [([1, 40, 41], [2]), ([1, 40, 41, 42], [3])]

    run, _ = make_run(tmp_path, "probe", ["ids.scheme=atomic"])
    out = probe.main(["--run", str(run.path), "--fmt", "--content-init", "--epochs", "1", "--hidden", "32"])
    assert out["best"]["epoch"] == 1 and 0.0 <= out["best"]["test_recall10"] <= 1.0


def test_template_render_bench_times_rendering_and_both_encodings(trained_run, tmp_path, monkeypatch):
    """bench.template_render on a trained run: the sandbox timings and the two prompt encodings, which it
    has checked give the same ids."""
    import json
    import sys

    import bench.template_render as tr

    run, _, _ = trained_run
    out = tmp_path / "render.json"
    argv = ["x", "--run", str(run.path), "--n", "20", "--users", "9", "--batch", "4", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    tr.main()
    res = json.loads(out.read_text())
    assert res["conversations"] == 9 and res["encode_one_call_each_us"] > 0 and res["encode_batched_4_us"] > 0
    assert res["plain_sandbox_us"] > 0 and res["bounded_traced_us"] > 0 and res["bounded_hot_path_us"] > 0


def test_ranking_host_bench_times_each_step_of_the_ranking_process(trained_run, tmp_path, monkeypatch):
    """bench.ranking_host on a trained run: every step of the ranking process's own CPU work is timed, and the
    bound it gives is what those times add up to."""
    import sys

    import bench.ranking_host as rh

    run, _, _ = trained_run
    out = tmp_path / "host.json"
    argv = [
        "x",
        "--run",
        str(run.path),
        "--users",
        "10",
        "--batch",
        "4",
        "--n-candidates",
        "20",
        "--repeats",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    rh.main()
    res = json.loads(out.read_text())
    steps = res["ms_per_user"]
    assert set(steps) == {"pack_inputs", "top_items_index", "edge_index", "recommendations"}
    assert all(v > 0 for v in steps.values()) and res["mean_tree_tokens"] > 0
    assert res["total_ms_per_user"] == pytest.approx(sum(steps.values()), abs=1e-3)
    assert res["bound_users_per_s"] == round(1000 / res["total_ms_per_user"])


def test_train_head_bench_times_both_heads_on_the_runs_own_rows(trained_run, tmp_path):
    from bench.train_head import main

    run, _, _ = trained_run
    out = tmp_path / "head.json"
    result = main(["--run", str(run.path), "--steps", "2", "--batch", "4", "--out", str(out)])
    assert json.loads(out.read_text())["speedup"] == result["speedup"] > 0
    assert 0 < result["labelled_per_step"] < result["positions_per_step"]
    trl, ours = result["trl_fused_head"], result["labelled_positions_head"]
    assert len(trl["steps"]) == len(ours["steps"]) == 2
    # the same weights, rows and optimizer: the same losses, step by step
    assert ours["losses"] == pytest.approx(trl["losses"], rel=1e-4)
    # the restricted softmaxes: timed too; their losses (over fewer tokens) are below the vocabulary softmax's,
    # and a level's below all ID tokens'
    ids_, level = result["id_softmax_ids"], result["id_softmax_level"]
    assert len(ids_["steps"]) == len(level["steps"]) == 2 and result["id_softmax_level_speedup"] > 0
    assert level["losses"][0] < ids_["losses"][0] < ours["losses"][0]


def test_prep_worker_bench_times_each_step_of_a_preparation_worker(trained_run, tmp_path, monkeypatch):
    """bench.prep_worker on a trained run: a worker's steps are timed, its total is `prepare` timed whole plus
    the steps after it, and what a batch costs to send is reported."""
    import sys

    import bench.prep_worker as pw

    run, _, _ = trained_run
    out = tmp_path / "worker.json"
    argv = ["x", "--run", str(run.path), "--users", "10", "--batch", "4", "--n-candidates", "20"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--out", str(out)])
    pw.main()
    res = json.loads(out.read_text())
    steps = res["ms_per_user"]
    assert set(steps) == {"render", "tokenize", "retrieve", "tries", "layouts", "pickle"}
    assert all(v >= 0 for v in steps.values()) and steps["render"] > 0 and steps["tokenize"] > 0
    after = steps["tries"] + steps["layouts"] + steps["pickle"]
    assert res["total_ms_per_user"] == pytest.approx(res["prepare_ms_per_user"] + after, abs=1e-3)
    assert res["bound_users_per_s"] == round(1000 / res["total_ms_per_user"])
    assert res["pickled_kb_per_user"] > 0 and res["ranking_process_unpickle_ms_per_user"] > 0
    assert res["mean_prompt_tokens"] > 0 and res["users"] == 10


@pytest.mark.parametrize("softmax", ["", "full"])
def test_gpu_suite_passes_the_id_softmax_to_every_engine_benchmark(tmp_path, softmax):
    """bench/gpu_suite.sh (run only on a lent GPU) hands ID_SOFTMAX to each bench.engine_throughput call, and
    leaves the run's own setting alone when it is unset; its gpu-tests part runs the tests marked gpu. A stand-in
    python3 records the calls."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncat > /dev/null\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "RUN": "runs/x",
        "OUT": str(tmp_path / "out"),
        "PARTS": "gpu-tests vllm hf hf-tree hf-eager hf-prep",
        "PREP": "8",
        "ID_SOFTMAX": softmax,
    }
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "bench/gpu_suite.sh"], cwd=root, env=env, check=True, capture_output=True)
    benches = [c for c in calls.read_text().splitlines() if c.startswith("-m bench.engine_throughput")]
    assert len(benches) == 7  # vllm, hf, hf-tree x3, hf-eager, hf-prep x1
    tests = [c for c in calls.read_text().splitlines() if c.startswith("-m pytest")]
    assert (
        len(tests) == 1 and "-m gpu tests/test_decoding.py tests/test_pipeline.py" in tests[0]
    )  # the GPU tests CI skips
    host = [c for c in calls.read_text().splitlines() if c.startswith("-m bench.ranking_host")]
    assert len(host) == 1  # hf-prep also times the ranking process's own work, and a preparation worker's
    assert sum(c.startswith("-m bench.prep_worker") for c in calls.read_text().splitlines()) == 1
    assert (
        calls.read_text().splitlines()[-1] == f"-m bench.batch_target {tmp_path / 'out'}"
    )  # the ratio, last
    for c in benches + host:
        assert ("--id-softmax full" in c) == bool(softmax) and c.count("--id-softmax") == int(bool(softmax))


def test_batch_target_reads_the_suites_results(tmp_path, monkeypatch, capsys):
    """bench.batch_target on the fourth H100 session's recorded files gives the ratios BENCHMARKS.md states (0.42
    of vLLM's greedy engine with 8 workers, 1.22 of its job rendering prompts, 0.50 of greedy with the same
    workers), and names the suite part whose results are missing."""
    import shutil
    import sys

    import bench.batch_target as bt

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    with pytest.raises(SystemExit, match=r"engine_vllm.json is missing: run the suite's `vllm` part"):
        bt.batch_target(tmp_path)
    shutil.copy(results / "h100_engine_vllm_run7.json", tmp_path / "engine_vllm.json")
    with pytest.raises(SystemExit, match=r"no engine_hf_retriever_exact_prep\*.json .*`hf-prep` part"):
        bt.batch_target(tmp_path)
    for n in (4, 8):
        shutil.copy(
            results / f"h100_engine_hf_retriever_exact_prep{n}_run7.json",
            tmp_path / f"engine_hf_retriever_exact_prep{n}.json",
        )
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path)])
    bt.main()
    out = json.loads((tmp_path / "batch_target.json").read_text())
    assert [r["prep_workers"] for r in out["rows"]] == [4, 8]
    eight = out["rows"][1]
    assert eight["users_per_s"] == 1020.3 and eight["vs_vllm_greedy_engine"] == pytest.approx(0.417)
    assert (
        eight["vs_vllm_greedy_rendering_prompts"] == pytest.approx(1.217)
        and eight["vs_greedy_same_workers"] == 0.503
    )
    assert out["best_ratio"] == pytest.approx(0.417) and out["met"] is False
    assert "target >= 0.6 of the greedy engine: not met (0.417)" in capsys.readouterr().out


def test_input_read_bench_reads_each_subset_both_ways(tmp_path, monkeypatch):
    """bench.input_read on a few synthetic users: the three formats, the scan, and each subset read as the job
    reads it and parsed whole then dropped, with the same rows."""
    import sys

    import bench.input_read as ir

    out = tmp_path / "read.json"
    monkeypatch.setattr(
        sys,
        "argv",
        ["x", "--users", "500", "--shards", "4", "--resume-at", "0.5", "--repeats", "1", "--out", str(out)],
    )
    ir.main()
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"jsonl", "jsonl.gz", "parquet"}
    assert results["jsonl.gz"]["bytes"] < results["jsonl"]["bytes"] / 2
    for r in results.values():
        assert r["rows"] == 500 and r["bytes"] > 500 * 10
        assert r["shard 0/4"]["rows"] == 125 and r["resume past 50%"]["rows"] == 250


def test_quality_reuse_evaluates_a_trained_run_without_training_it_again(
    trained_run, tmp_path, monkeypatch, capsys
):
    """--reuse on a run whose evaluation died: the model is not trained again, the evaluation resumes."""
    import shutil

    import genrec.training

    run = trained_run[0]
    (tmp_path / "shared" / "tiny").mkdir(parents=True)
    monkeypatch.setattr(quality, "SHARED", tmp_path / "shared")
    monkeypatch.setitem(quality.DATASETS, "tiny", ("unused.yaml", "tiny", {}))
    runs = tmp_path / "runs"
    shutil.copytree(
        run.path, runs / "tiny", ignore=shutil.ignore_patterns("checkpoints", "eval_*", "report_*")
    )
    (runs / "tiny" / "eval_test.parts").mkdir()  # what an interrupted evaluation leaves

    def no_training(*a, **kw):
        raise AssertionError("trained again")

    monkeypatch.setattr(genrec.training, "train", no_training)
    out = quality.run_dataset("tiny", runs=runs, overrides=[], reuse=True)
    assert "reusing the trained model" in capsys.readouterr().out
    assert out is not None and out["results"]["genrec"]["validity"] == 1.0
    assert (runs / "tiny" / "eval_test.json").is_file() and not (runs / "tiny" / "eval_test.parts").exists()


def test_paired_runs_compares_two_runs_user_by_user_and_refuses_different_users(tmp_path):
    import pandas as pd

    from bench.common import paired_runs

    def write(run: Path, ndcg: list[float], users: list[str]) -> None:
        run.mkdir()
        rows = [
            {"method": m, "user": u, "recall@10": float(x > 0), "ndcg@10": x, "mrr": x / 2}
            for m in ("genrec", "popularity")
            for u, x in zip(users, ndcg if m == "genrec" else [0.0] * len(users), strict=True)
        ]
        pd.DataFrame(rows).to_parquet(run / "eval_test_cold_users.parquet", index=False)

    write(tmp_path / "a", [1.0, 0.5, 0.0, 0.5], ["u3", "u1", "u2", "u4"])
    write(tmp_path / "b", [0.5, 0.5, 0.0, 0.0], ["u1", "u3", "u4", "u2"])
    out = paired_runs(tmp_path / "a", tmp_path / "b", stem="test_cold")
    # by user: a = {u3: 1, u1: .5, u2: 0, u4: .5}, b = {u1: .5, u3: .5, u4: 0, u2: 0} -> differences .5, 0, 0, .5
    assert out["users"] == 4
    assert out["run"]["ndcg@10"] == 0.5 and out["base"]["ndcg@10"] == 0.25
    d = out["run_minus_base"]["ndcg@10"]
    assert d["diff"] == 0.25 and d["low"] < 0.25 < d["high"]
    write(tmp_path / "c", [0.0, 0.0, 0.0, 0.0], ["u1", "u2", "u3", "u9"])
    with pytest.raises(ValueError, match="different users"):
        paired_runs(tmp_path / "a", tmp_path / "c", stem="test_cold")


def test_text_protocols_mix_fills_only_what_the_recipe_leaves_off():
    from bench.text_protocols import MIX, mix_for
    from genrec.config import apply_overrides, load_config

    assert mix_for(load_config("tiny.yaml")) == MIX  # no mix of its own: the benchmark's
    own = apply_overrides(load_config("tiny.yaml"), ["train.need_rows=0.25", "train.title_rows=0.1"])
    assert mix_for(own) == ["data.cold_items=0.1", "train.item_text_rows=1.0"]


def test_http_floor_answers_as_the_chat_endpoint_does_without_a_model(small_data):
    """The floor server's replies pass bench.load's validity check: n distinct catalogue items, none in the
    history; a body over the limit is refused as genrec's server refuses it."""
    from bench.http_floor import fastapi_floor_app, floor_app
    from bench.load import Target

    ids = list(small_data.catalog.item_ids)
    tg = Target(mode="genrec", model="m", n_items=5, catalog=set(ids))
    for make in (floor_app, fastapi_floor_app):
        check_floor(make(ids, model="m"), ids, tg)


def check_floor(app, ids, tg):
    import asyncio

    import httpx

    from bench.load import Job, body, validity

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://floor") as client:
            out = []
            for job in (Job(ids[:3]), Job(ids[3:10])):
                path, payload = body(tg, job)
                out.append(await client.post(path, json=payload))
            out.append(await client.post("/v1/chat/completions", content=b"x" * (2 << 20)))
            return out

    first, second, big = asyncio.run(go())
    assert validity(tg, Job(ids[:3]), first.json()) == 1.0
    assert validity(tg, Job(ids[3:10]), second.json()) == 1.0
    assert big.status_code == 413
