"""The command line: help that helps, JSON last lines, clear errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from windtunnel.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "windtunnel", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_commands_and_config_groups() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for word in (
        "prepare",
        "train",
        "params",
        "coordcheck",
        "bench",
        "fit",
        "plan",
        "model",
        "micro_s",
        "minicpm_9m",
    ):
        assert word in out.stdout
    train_help = _run("train", "--help")
    assert train_help.returncode == 0 and "experiment" in train_help.stdout


@pytest.mark.parametrize("command", ["fit", "plan"])
def test_delegated_commands_have_their_own_help(command: str) -> None:
    out = _run(command, "--help")
    assert out.returncode == 0 and "--json" in out.stdout


def test_bad_override_is_a_clear_error_not_a_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["params", "model=does_not_exist"]) == 2
    err = capsys.readouterr().err
    assert "does_not_exist" in err and "Traceback" not in err


def test_params_prints_one_json_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["params", "model=micro_s"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["non_embedding_params"] == 188_992


def test_bench_reports_ratios(capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "--models", "micro_xxs", "--steps", "2", "--no-compile", "data.seq_len=64"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["rows"][0]
    assert out["matmul_peak_flops"] > 0
    assert row["tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
    assert 0 < row["share_of_peak"] < 1.5
