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
