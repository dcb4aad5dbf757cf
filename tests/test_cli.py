import subprocess
import sys

import pytest
from typer.testing import CliRunner

from genrec.cli import app
from genrec.errors import GenrecError, RunError

runner = CliRunner()
COMMANDS = [
    "quickstart",
    "prepare",
    "build-ids",
    "train",
    "merge",
    "recommend",
    "evaluate",
    "generate",
    "serve",
]
PROMPT_COMMANDS = [
    "list",
    "show",
    "render",
    "validate",
    "diff",
    "history",
    "new",
    "save",
    "activate",
    "rollback",
]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_explains_itself(cmd):
    result = runner.invoke(app, [cmd, "--help"])
    assert result.exit_code == 0
    assert "--run" in result.output


@pytest.mark.parametrize("cmd", PROMPT_COMMANDS)
def test_every_prompts_command_explains_itself(cmd):
    result = runner.invoke(app, ["prompts", cmd, "--help"])
    assert result.exit_code == 0 and "--run" in result.output


def test_missing_run_names_the_missing_file_and_the_fix(tmp_path):
    result = runner.invoke(app, ["build-ids", "--run", str(tmp_path / "nope")])
    assert isinstance(result.exception, RunError)
    assert "config.yaml is missing" in str(result.exception) and "genrec prepare" in str(result.exception)


def test_bad_override_is_reported(tmp_path):
    result = runner.invoke(app, ["prepare", "--run", str(tmp_path / "r"), "-s", "data.kcor=3"])
    assert isinstance(result.exception, GenrecError) and "unknown field 'kcor'" in str(result.exception)


def test_console_script_exits_2_with_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "genrec.cli", "recommend", "--run", str(tmp_path), "--user", "u"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "error: run" in proc.stderr and "config.yaml is missing" in proc.stderr


def test_prepare_cli_on_synthetic(tmp_path):
    result = runner.invoke(
        app,
        [
            "prepare",
            "--run",
            str(tmp_path / "r"),
            "-s",
            "data.synthetic_items=200",
            "-s",
            "data.synthetic_users=60",
            "-s",
            "data.kcore=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "prepared" in result.output and (tmp_path / "r" / "config.yaml").is_file()


def test_search_option_on_the_ranking_commands(trained_run):
    """--search picks how the transformers engine ranks; a bad value or exact on vLLM names the fix."""
    run, _, _ = trained_run
    from genrec.recommender import Recommender

    user = Recommender.load(run, device="cpu").data.users[0]
    outs = []
    for search in ("exact", "beam"):
        result = runner.invoke(
            app, ["recommend", "--run", str(run.path), "--user", user, "-n", "3", "--search", search]
        )
        assert result.exit_code == 0, result.output
        outs.append(
            [line.split()[1] for line in result.output.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
        )
    assert len(outs[0]) == 3 and len(set(outs[0])) == 3  # both ways list three distinct items
    assert len(outs[1]) == 3 and len(set(outs[1])) == 3
    bad = runner.invoke(app, ["recommend", "--run", str(run.path), "--user", user, "--search", "greedy"])
    assert isinstance(
        bad.exception, GenrecError
    ) and "--search / eval.search must be one of auto, beam, exact; got 'greedy'" in str(bad.exception)
    args = ["generate", "--run", str(run.path), "-i", "x.jsonl", "-o", "y.jsonl", "--backend", "vllm"]
    vllm = runner.invoke(app, [*args, "--search", "exact"])
    assert isinstance(vllm.exception, GenrecError) and "use --backend hf" in str(vllm.exception)
    for cmd in ("serve", "generate", "recommend"):
        assert "--search" in runner.invoke(app, [cmd, "--help"]).output


def test_serve_options_reach_the_server_limits(tmp_path, monkeypatch):
    """`genrec serve`'s queue, batch, history, timeout and wait options end up in the service's limits."""
    import genrec.serve.main
    from genrec.serve.service import ServeLimits

    seen = []
    monkeypatch.setattr(genrec.serve.main, "serve", seen.append)
    argv = ["serve", "--run", str(tmp_path), "--max-queue", "7", "--max-batch", "3", "--max-history", "40"]
    argv += ["--timeout", "9", "--batch-wait-ms", "2", "--fixed-wait", "--api-key", "k", "--port", "9"]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    (args,) = seen
    assert args.limits == ServeLimits(
        max_history=40,
        max_queue=7,
        max_batch=3,
        batch_wait_ms=2,
        adaptive_wait=False,
        request_timeout_s=9,
        warmup_requests=32,  # the CLI's default
    )
    assert (args.port, args.api_keys, args.backend) == (9, ["k"], "hf")
    assert (
        runner.invoke(app, [*argv, "--warmup", "0"]).exit_code == 0 and seen[-1].limits.warmup_requests == 0
    )
    assert args.frontends == 1  # one process unless asked
    assert runner.invoke(app, [*argv, "--frontends", "3"]).exit_code == 0 and seen[-1].frontends == 3
    assert runner.invoke(app, [*argv, "--frontends", "0"]).exit_code != 0
    assert runner.invoke(app, [*argv, "--warmup", "-1"]).exit_code != 0


def test_generate_rejects_bad_prep_workers_before_loading_a_model(tmp_path):
    """--prep-workers is checked first (no model load): a negative count, and ray (which has its own --workers)."""
    base = [
        "generate",
        "--run",
        str(tmp_path / "r"),
        "-i",
        str(tmp_path / "u.jsonl"),
        "-o",
        str(tmp_path / "o.jsonl"),
    ]
    bad = runner.invoke(app, [*base, "--prep-workers", "-1"])
    assert "--prep-workers must be >= 0, got -1" in str(bad.exception)
    ray = runner.invoke(app, [*base, "--backend", "ray", "--prep-workers", "2"])
    assert "--prep-workers is for --backend hf/vllm" in str(ray.exception)


def test_prepare_and_build_ids_refuse_to_leave_a_trained_model_stale(tmp_path):
    run = tmp_path / "r"
    small = ["-s", "data.synthetic_items=200", "-s", "data.synthetic_users=60", "-s", "data.kcore=2"]
    assert runner.invoke(app, ["prepare", "--run", str(run), *small]).exit_code == 0
    (run / "merged").mkdir()
    (run / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    for cmd in (["prepare", *small], ["build-ids"]):
        result = runner.invoke(app, [cmd[0], "--run", str(run), *cmd[1:]])
        assert isinstance(result.exception, GenrecError)
        assert "checkpoints/, merged/" in str(result.exception) and "--force" in str(result.exception)
        assert (run / "merged").is_dir()  # nothing deleted without --force
    result = runner.invoke(app, ["prepare", "--run", str(run), *small, "--force"])
    assert result.exit_code == 0, result.output
    assert "deleted checkpoints/, merged/" in result.output
    assert not (run / "merged").exists() and not (run / "checkpoints").exists()
