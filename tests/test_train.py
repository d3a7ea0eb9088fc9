"""The trainer: WSD decay branches, bit-for-bit resume after a kill, typed divergence."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import journal_counts, journal_metrics, tiny_overrides

from windtunnel.compose import compose_run as compose
from windtunnel.flops import Shape, flops_per_token
from windtunnel.train import train


def test_branches_are_finished_points_equal_to_standalone_runs(tmp_path: Path) -> None:
    """Each decay branch is its own finished point, and equals a plain WSD run of that length."""
    branched = train(compose(tiny_overrides(tmp_path, "train.branch_tokens=[8192,16384]")))
    assert branched.status == "finished"
    assert [p.tokens for p in branched.points] == [8192, 16384]
    assert len({p.run_id for p in branched.points} | {branched.run_id}) == 3
    assert all(p.val_loss < branched.initial_val_loss for p in branched.points)
    assert branched.points[1].val_loss < branched.points[0].val_loss  # more data, lower loss
    # a point's compute is its D tokens at the FLOPs per token of the model's shape (6N plus
    # the head and attention terms, windtunnel.flops)
    cfg = json.loads((Path(branched.run_dir) / "config.json").read_text())
    shape = Shape(**{f.name: cfg["model"][f.name] for f in dataclasses.fields(Shape)})
    per_token = flops_per_token(shape, cfg["data"]["seq_len"])
    assert per_token > 6 * branched.N
    for p in branched.points:
        assert p.N == branched.N and p.tokens == p.D
        assert p.flops == p.D * per_token
        assert set(p.domains) == {"prose", "code"}
        bpb = sum(d["bpb"] for d in p.domains.values()) / 2
        assert p.val_bpb == pytest.approx(bpb)

    alone = train(compose(tiny_overrides(tmp_path, "train.tokens=8192")))
    assert alone.val_loss == branched.points[0].val_loss  # bit-for-bit on CPU
    p0 = branched.points[0]
    assert (alone.N, alone.tokens, alone.flops) == (p0.N, p0.D, p0.flops)


def test_rerun_of_finished_run_returns_result_without_training(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path, "train.tokens=4096", "name=again")
    first = train(compose(overrides))
    t0 = time.perf_counter()
    second = train(compose(overrides))
    assert second.val_loss == first.val_loss and second.run_id == first.run_id
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="different config"):
        train(compose([*overrides, "optim.lr=0.02"]))


def _cli(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "windtunnel", "train", *tiny_overrides(tmp, *extra)]


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_killed_and_resumed_run_has_the_same_curve(tmp_path: Path, how: str) -> None:
    """A run killed mid-way (SIGKILL: crash; SIGTERM: preemption) and rerun produces the
    same loss curve, point for point, as an uninterrupted run, with no duplicated points."""
    budget = [
        "train.tokens=196608",
        "train.checkpoint_every_tokens=8192",
        "train.eval_every_tokens=16384",
    ]
    env = {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}
    ref = subprocess.run(
        _cli(tmp_path, *budget, "name=ref"), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    cmd = _cli(tmp_path, *budget, "name=killed")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "runs" / "killed" / "ckpt" / "main"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: raise the budget"
    proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    if how == "sigterm":
        assert proc.returncode == 75, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["status"] == "preempted"
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "runs" / "killed" / "result.json").exists()

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_json = json.loads(ref.stdout.strip().splitlines()[-1])
    res_json = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert res_json["val_loss"] == ref_json["val_loss"]

    a = journal_metrics(tmp_path / "runs" / "ref" / "journal.jsonl")
    b = journal_metrics(tmp_path / "runs" / "killed" / "journal.jsonl")
    for name in ("train/loss", "val_loss", "val_bpb", "lr"):
        assert b[name] == a[name], name
    counts = journal_counts(tmp_path / "runs" / "killed" / "journal.jsonl")
    assert max(counts.values()) == 1, "a metric point was logged twice after resume"
    started = [e for e in _events(tmp_path / "runs/killed/journal.jsonl") if e["ev"] == "start"]
    assert len(started) == 1, "the resumed run must continue the same tracked run"
    assert res_json["run_id"] == started[0]["run_id"]


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_divergence_is_a_typed_failure_recorded_in_the_journal(tmp_path: Path) -> None:
    env = {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}
    proc = subprocess.run(
        _cli(tmp_path, "train.tokens=16384", "optim.lr=1e4", "optim.grad_clip=0", "name=boom"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "diverged"
    assert result["failure"]
    assert math.isnan(result["val_loss"])
    events = _events(tmp_path / "runs/boom/journal.jsonl")
    finish = [e for e in events if e["ev"] == "finish"]
    assert finish and finish[-1]["status"] == "FAILED" and "diverged" in finish[-1]["error"]
    tags = {k: v for e in events if e["ev"] == "tags" for k, v in e["tags"].items()}
    assert tags["wt.failure"] == "diverged"


def test_bad_budget_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="less than one step"):
        train(compose(tiny_overrides(tmp_path, "train.tokens=10")))
    with pytest.raises(ValueError, match="strictly increasing"):
        train(compose(tiny_overrides(tmp_path, "train.branch_tokens=[8192,4096]")))
