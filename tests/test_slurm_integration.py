"""Against a real single-node SLURM cluster (``scripts/slurm.sh up``): job arrays with a
parallelism cap, and real preemption — a checkpointable job in the `low` partition preempted by a
job in the `high` partition gets SIGUSR2, requeues, resumes from its checkpoint and returns what an
uninterrupted run returns.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO

from windtunnel.launch import demo, make_launcher

pytest_plugins = ["fixtures_services"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WAIT = 180  # seconds: upper bound for any one wait on the cluster
SLURM_SH = REPO / "scripts" / "slurm.sh"


def _sacct(job_id: str, *fields: str, duplicates: bool = False) -> list[list[str]]:
    cmd = ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields)]
    if duplicates:
        cmd.append("--duplicates")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def _sacct_until(job_id: str, ok, *fields: str, duplicates: bool = False) -> list[list[str]]:
    """Poll sacct until ``ok(rows)``: accounting lags the result files by a second or so."""
    deadline = time.monotonic() + WAIT
    while True:
        rows = _sacct(job_id, *fields, duplicates=duplicates)
        if ok(rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def _wait_step(ckpt: Path, at_least: int, timeout: float = WAIT) -> None:
    state = ckpt / "state.json"
    deadline = time.monotonic() + timeout
    while True:
        if state.exists():
            try:
                if json.loads(state.read_text())["step"] >= at_least:
                    return
            except (ValueError, KeyError):
                pass
        assert time.monotonic() < deadline, f"{state} did not reach step {at_least}"
        time.sleep(0.1)


def _slurm(root: Path, **options):
    # timeout_min > 10: submitit counts any SIGUSR2 within 10 min of a shorter limit as a timeout
    return make_launcher(
        name="slurm", folder=str(root), timeout_min=30, poll_interval_s=0.5, **options
    )


def test_cluster_is_up_and_up_is_idempotent(slurm_cluster):
    out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30)
    assert "low* up" in out.stdout and "high up" in out.stdout
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SLURM_SH), "up"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10  # already up: no restart
    r = subprocess.run(
        ["bash", str(SLURM_SH), "status"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "sacct: ok" in r.stdout


def test_job_array_with_parallelism_cap(slurm_cluster, submitit_root):
    launcher = _slurm(submitit_root, array_parallelism=2, job_name="wt-array")
    jobs = launcher.map_array(demo.sleep_then, [(1.0, i) for i in range(6)])
    assert [j.result(timeout=WAIT) for j in jobs] == list(range(6))
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(6)]
    script = (launcher.folder / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-5%2" in script
    rows = _sacct_until(
        array_id,
        lambda rows: len(rows) == 6 and {r[1] for r in rows} == {"COMPLETED"},
        *("JobID", "State", "Start", "End"),
    )
    # never more than 2 tasks running at once
    spans = [(datetime.fromisoformat(r[2]), datetime.fromisoformat(r[3])) for r in rows]
    for s, _ in spans:
        assert sum(1 for a, b in spans if a <= s < b) <= 2


def test_preemption_requeues_and_resumes_from_checkpoint(slurm_cluster, submitit_root, tmp_path):
    steps, step_s = 30, 0.2
    uninterrupted = demo.resumable_count(str(tmp_path / "reference"), steps, step_s=0)
    low = _slurm(submitit_root, partition="low", job_name="wt-low")
    high = _slurm(
        submitit_root, partition="high", job_name="wt-high", cpus_per_task=slurm_cluster["cpus"]
    )
    ckpt = tmp_path / "ckpt"
    t0 = time.monotonic()
    job = low.submit(demo.resumable_count, str(ckpt), steps, step_s)
    _wait_step(ckpt, 5)
    urgent = high.submit(demo.add, 1, 2)  # needs the whole node: preempts the low job
    assert urgent.result(timeout=WAIT) == 3
    result = job.result(timeout=WAIT)
    elapsed = time.monotonic() - t0
    assert result["total"] == uninterrupted["total"] and result["steps"] == steps
    assert result["starts"] == 2, result  # preempted once ...
    assert result["start_steps"][0] == 0 and result["start_steps"][1] >= 5  # ... and resumed
    log = (low.folder / f"{job.job_id}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in log and "preempted" in log
    rows = _sacct_until(job.job_id, lambda r: r[-1][0] == "COMPLETED", "State", duplicates=True)
    assert any(r[0] in ("PREEMPTED", "REQUEUED") for r in rows[:-1]), rows
    print(f"preemption end to end: {elapsed:.1f} s")


def test_packed_job_preemption_keeps_finished_trials(slurm_cluster, submitit_root, tmp_path):
    low = _slurm(submitit_root, partition="low", job_name="wt-pack", trials_per_job=2)
    high = _slurm(
        submitit_root, partition="high", job_name="wt-high", cpus_per_task=slurm_cluster["cpus"]
    )
    short, long_ = tmp_path / "short", tmp_path / "long"
    jobs = low.map_array(demo.resumable_count, [(str(short), 3, 0.1), (str(long_), 30, 0.2)])
    _wait_step(long_, 8)  # the short trial has finished by now
    assert high.submit(demo.add, 2, 2).result(timeout=WAIT) == 4
    a, b = (j.result(timeout=WAIT) for j in jobs)
    assert a["starts"] == 1 and a["total"] == 14  # finished before preemption: not rerun
    assert b["starts"] == 2 and b["start_steps"][1] >= 8
    assert b["total"] == sum(i * i for i in range(1, 31))
