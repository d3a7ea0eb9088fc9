"""One run on several ranks (CPU, gloo): the same curve as one process, resumable across world
sizes and preemption, one record of the run.

Tolerance: fp32 on CPU. With W ranks the gradient is the average of W partial means (DDP's
all-reduce, FSDP's reduce-scatter) instead of one mean over the batch, and evaluation sums per
rank before reducing: the same numbers added in another order. That moves the loss by ~1e-7
relative per step; over these runs (≤ 64 steps of Adam, whose normalisation amplifies tiny
differences of small gradients) the curves agree to 1e-4 relative, the tolerance used here. A
wrong batch slice, a missing gradient reduction or a lost μP group moves them by > 1e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import assert_same_curves, journal_counts, journal_metrics, tiny_overrides

from windtunnel import checkpoint

RTOL = 1e-4
BRANCHED = ("train.branch_tokens=[6144,12288]", "train.eval_every_tokens=2048")
LONG = ("train.tokens=24576", "train.eval_every_tokens=2048", "train.checkpoint_every_tokens=2048")
ENV = {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1", "PYTHONFAULTHANDLER": "1"}
WAIT = 240


def _cmd(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "windtunnel", "train", *tiny_overrides(tmp, *extra)]


def _run(tmp: Path, *extra: str) -> dict:
    proc = subprocess.run(_cmd(tmp, *extra), env=ENV, capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same_curves(got: Path, want: Path) -> None:
    assert_same_curves(got, want, RTOL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny proxy on one process, with two WSD decay branches."""
    tmp = tmp_path_factory.mktemp("one")
    _run(tmp, *BRANCHED, "name=ref")
    return tmp / "runs" / "ref"


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("long")
    _run(tmp, *LONG, "name=ref")
    return tmp / "runs" / "ref"


@pytest.mark.parametrize(
    "layout",
    [("train.parallel=ddp",), ("train.parallel=fsdp", "optim.grad_accum=2")],
    ids=["ddp", "fsdp-accum2"],
)
def test_two_ranks_train_the_single_process_curve(tmp_path, reference, layout):
    result = _run(tmp_path, *BRANCHED, "name=ref", "train.nproc_per_node=2", *layout)
    run = tmp_path / "runs" / "ref"
    _assert_same_curves(run, reference)
    assert [p["D"] for p in result["branches"]] == [6144, 12288]
    # rank 0 alone records: each point journaled once, one run per segment
    for journal in run.rglob("journal.jsonl"):
        assert set(journal_counts(journal).values()) == {1}, journal
    # the decay branches forked from sharded checkpoints, each saved once by both ranks
    for fork in ("fork-6144", "fork-12288"):
        meta = checkpoint.read_meta(run / "ckpt" / fork)
        assert meta["world_size"] == 2 and meta["parallel"] == layout[0].split("=")[1]


def test_accumulation_of_micro_batches_equals_the_whole_batch(tmp_path, reference):
    """4 micro-batches of 2 rows: the same steps as 1 batch of 8 (rows of the same batch)."""
    _run(tmp_path, *BRANCHED, "name=ref", "optim.grad_accum=4")
    _assert_same_curves(tmp_path / "runs" / "ref", reference)


def test_activation_checkpointing_trains_the_same_curve(tmp_path, reference):
    """Recomputing each block in the backward pass saves memory, not results."""
    _run(tmp_path, *BRANCHED, "name=ref", "train.activation_checkpointing=true")
    _assert_same_curves(tmp_path / "runs" / "ref", reference)


def _children(pid: int, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        kids = [p for p in psutil.Process(pid).children() if "windtunnel" in " ".join(p.cmdline())]
        if len(kids) == n:
            return kids
        time.sleep(0.1)
    raise AssertionError(f"{n} ranks did not start")


def _wait_checkpoint(path: Path, proc: subprocess.Popen, at_least: int = 1) -> None:
    deadline = time.monotonic() + WAIT
    while not checkpoint.exists(path) or checkpoint.read_meta(path)["step"] < at_least:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)


def test_sigusr2_to_one_rank_stops_both_at_one_step_and_resumes_on_one(tmp_path, long_reference):
    cmd = _cmd(tmp_path, *LONG, "name=ref", "train.nproc_per_node=2")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = _children(proc.pid, 2)
    run = tmp_path / "runs" / "ref"
    _wait_checkpoint(run / "ckpt" / "main", proc)
    ranks[-1].send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    # both ranks stopped at the step they agreed on, and saved it once, together
    stopped = checkpoint.read_meta(run / "ckpt" / "main")
    steps = journal_metrics(run / "journal.jsonl")["train/loss"]
    assert stopped["world_size"] == 2 and max(steps) == stopped["step"] * 8 * 32
    assert not (run / "result.json").exists()

    result = _run(tmp_path, *LONG, "name=ref")  # resumed on one process
    assert result["status"] == "finished"
    _assert_same_curves(run, long_reference)
    assert set(journal_counts(run / "journal.jsonl").values()) == {1}


def test_single_process_run_resumes_on_two_sharded_ranks_under_torchrun(tmp_path, long_reference):
    cmd = _cmd(tmp_path, *LONG, "name=ref")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "ref"
    _wait_checkpoint(run / "ckpt" / "main", proc, at_least=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 75, err[-3000:]
    assert checkpoint.read_meta(run / "ckpt" / "main")["world_size"] == 1

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    args = tiny_overrides(tmp_path, *LONG, "name=ref", "train.parallel=fsdp")
    resumed = subprocess.run(
        [*torchrun, "-m", "windtunnel", "train", *args],
        env={**ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_curves(run, long_reference)
    assert checkpoint.read_meta(run / "ckpt" / "main")["parallel"] == "fsdp"


def test_a_rank_that_dies_stops_the_other_and_the_run_resumes(tmp_path, long_reference):
    cmd = _cmd(tmp_path, *LONG, "name=ref", "train.nproc_per_node=2")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = _children(proc.pid, 2)
    run = tmp_path / "runs" / "ref"
    _wait_checkpoint(run / "ckpt" / "main", proc)
    t0 = time.monotonic()
    ranks[0].kill()
    _, err = proc.communicate(timeout=WAIT)
    assert time.monotonic() - t0 < 60, "the surviving rank hung"
    assert proc.returncode != 0 and not any(
        r.is_running() and r.status() != "zombie" for r in ranks
    )
    assert "was killed by SIGKILL" in err and "Rerun the same command" in err

    _run(tmp_path, *LONG, "name=ref", "train.nproc_per_node=2")
    _assert_same_curves(run, long_reference)


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (("train.nproc_per_node=64",), {}, "train.nproc_per_node=64 but this machine has"),
        (("train.nproc_per_node=2", "optim.batch_size=9"), {}, "2 ranks cannot split"),
        ((), {"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR, MASTER_PORT are not set"),
    ],
    ids=["nproc-above-cores", "batch-not-divisible", "no-rendezvous"],
)
def test_bad_layouts_are_one_line_errors(tmp_path, extra, env, message):
    proc = subprocess.run(
        _cmd(tmp_path, "train.tokens=4096", *extra),
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    import torch

    from windtunnel.config import ModelConfig, resolve_model
    from windtunnel.distributed import World
    from windtunnel.model import Decoder

    def model(d: int) -> Decoder:
        cfg = resolve_model(ModelConfig(name="t", n_layers=1, d_model=d, n_heads=2), 64)
        return Decoder(cfg)

    small = model(16)
    opt = torch.optim.AdamW(small.parameters())
    checkpoint.save(tmp_path / "c", small, opt, {"step": 3, "guard": [1.0, 1.0]}, World())
    big = model(32)
    with pytest.raises(checkpoint.CheckpointError, match=r"different model \(d_model 16 vs 32"):
        checkpoint.load(tmp_path / "c", big, torch.optim.AdamW(big.parameters()), World())
    again = model(16)
    assert checkpoint.load_model(tmp_path / "c", again)["step"] == 3
    assert all(a.equal(b) for a, b in zip(small.state_dict().values(), again.state_dict().values()))
    shutil.rmtree(tmp_path / "c")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_mup_groups_and_init_survive_wrapping(tmp_path, parallel):
    """Every rank's optimizer holds the single process's μP groups (lr/m for hidden matrices,
    no decay on embeddings and vectors) over the same initial weights."""
    probe = str(Path(__file__).parent / "dist_probe.py")
    args = ["model=micro_xxs", "data.vocab_size=300", "optim.lr=0.02", f"train.parallel={parallel}"]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = subprocess.run(
        [sys.executable, probe, *args],
        env={**ENV, "WT_PROBE_OUT": str(tmp_path / "one")},
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    two = subprocess.run(
        [*torchrun, probe, *args],
        env={**ENV, "OMP_NUM_THREADS": "1", "WT_PROBE_OUT": str(tmp_path / "two")},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert two.returncode == 0, two.stderr[-8000:]
    ref = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "two").glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    m = 32 / 64  # micro_xxs: d_model 32 over dim_model_base 64
    by_name = {g["name"]: g for g in ref["groups"]}
    assert by_name["hidden"]["lr"] == pytest.approx(0.02 / m) and by_name["vector"]["lr"] == 0.02
    assert by_name["embedding"]["weight_decay"] == 0 and by_name["hidden"]["weight_decay"] > 0
    for rank in ranks:
        assert rank["net"] == {"ddp": "DistributedDataParallel", "fsdp": "FSDPDecoder"}[parallel]
        for got, want in zip(rank["groups"], ref["groups"], strict=True):
            assert {k: got[k] for k in ("name", "lr", "lr_scale", "weight_decay", "numel")} == {
                k: want[k] for k in ("name", "lr", "lr_scale", "weight_decay", "numel")
            }
            assert got["sum_sq"] == pytest.approx(want["sum_sq"], rel=1e-12)


def test_fsdp_on_a_model_too_small_to_shard_says_to_use_ddp():
    from windtunnel.compose import compose_run
    from windtunnel.config import resolve
    from windtunnel.engine import fsdp_refusal

    def res(*overrides: str):
        cfg = compose_run(["train.parallel=fsdp", *overrides])
        return resolve(cfg, cfg.data.vocab_size)

    line = fsdp_refusal(res("model=micro_s"), 2)
    assert "train.parallel=fsdp on a" in line and "use train.parallel=ddp" in line
    assert "\n" not in line
    assert fsdp_refusal(res("model=micro_s"), 1) == ""  # one rank: nothing is sharded
    assert fsdp_refusal(res("model=minicpm_0p1b"), 8) == ""
    assert fsdp_refusal(res("model=micro_s", "train.parallel=ddp"), 2) == ""
