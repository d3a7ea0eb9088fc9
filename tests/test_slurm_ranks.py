"""One trial on several ranks through SLURM: ``launcher.nodes`` x ``launcher.tasks_per_node``
tasks (default one per GPU), torchrun's variables exported from SLURM's in each task, rank 0's
result for the job, one record of the run.

The unit tests check the options, the refusals and the exported variables; the integration
tests run on the project's single-node SLURM cluster (``scripts/slurm.sh up``, 2 CPUs: a 2-task
job of one CPU per task takes the whole node):

* ``windtunnel train ... launcher=slurm launcher.tasks_per_node=2`` trains the curve of one
  process (to the 1e-4 relative of ``tests/test_distributed.py``) with a 2-rank checkpoint;
* a rank that raises ends the job at once (``srun --kill-on-bad-exit``) with that rank's error;
* a sweep whose trials span 2 ranks records one MLflow run per trial, not one per rank;
* a 2-task job preempted in the `low` partition is requeued and resumes to the same curve.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
from conftest import REPO
from helpers import assert_same_curves, journal_counts, tiny_overrides

from windtunnel import checkpoint
from windtunnel.compose import compose_launcher
from windtunnel.launch import SlurmOptions, TrialError, demo, launcher_options, make_launcher
from windtunnel.launch.options import LocalOptions, RayOptions, with_ranks
from windtunnel.launch.slurm import MASTER_PORTS, export_rank_env, slurm_parameters

pytest_plugins = ["fixtures_services", "fixtures_mlflow"]
pytestmark = pytest.mark.timeout(300)

# the functions below run on the SLURM node without importing this module: send them by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RTOL = 1e-4  # 2 ranks vs 1 process in fp32 on CPU: see tests/test_distributed.py
WAIT = 180
SMOKE = REPO / "sweeps" / "smoke.yaml"
BRANCHED = ("train.branch_tokens=[6144,12288]", "train.eval_every_tokens=2048")
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}


def _port(job_id: str) -> int:
    low, high = MASTER_PORTS
    return low + int(job_id) % (high - low)


# --- options and refusals (no services) -----------------------------------------------------------
def test_ranks_of_a_slurm_trial():
    assert SlurmOptions().world_size == 1
    assert SlurmOptions(gpus_per_node=8).ranks_per_node == 8  # one rank per GPU
    full = SlurmOptions(nodes=16, gpus_per_node=8)
    assert (full.ranks_per_node, full.world_size) == (8, 128)
    assert SlurmOptions(tasks_per_node=2).world_size == 2  # CPU nodes: said explicitly
    # packing keeps one task per job (its trials are processes of that task)
    assert SlurmOptions(trials_per_job=4, gpus_per_node=1).world_size == 1
    assert SlurmOptions(trials_per_job=4, gpus_per_node=8).world_size == 1
    params = slurm_parameters({"nodes": 16, "gpus_per_node": 8})
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"]) == (16, 8, 8)
    assert params["srun_args"] == ["--kill-on-bad-exit=1"]
    assert "srun_args" not in slurm_parameters({})  # one task: nothing to stop


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"trials_per_job": 4, "tasks_per_node": 2},
            "launcher.trials_per_job=4 packs one-process trials into a job, but each trial here "
            "spans 2 ranks",
        ),
        ({"nodes": 2, "trials_per_job": 2}, "spans 2 ranks (launcher.nodes=2"),
        ({"nodes": 0}, "launcher.nodes must be >= 1, got 0"),
        ({"tasks_per_node": 0}, "launcher.tasks_per_node must be >= 1, got 0"),
    ],
    ids=["pack-and-span", "pack-on-nodes", "no-nodes", "no-tasks"],
)
def test_slurm_layouts_refused_in_one_line(options, message):
    with pytest.raises(ValueError) as info:
        launcher_options({"name": "slurm", **options})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nproc_per_node_on_each_launcher():
    slurm = SlurmOptions()
    assert with_ranks(slurm, 1) is slurm
    assert with_ranks(slurm, 4).tasks_per_node == 4  # the ranks of a node are its tasks
    assert with_ranks(SlurmOptions(gpus_per_node=8), 8).world_size == 8
    with pytest.raises(ValueError, match=r"nproc_per_node=2 but launcher.gpus_per_node=8"):
        with_ranks(SlurmOptions(gpus_per_node=8), 2)
    with pytest.raises(ValueError, match=r"nproc_per_node=2 but launcher.tasks_per_node=4"):
        with_ranks(SlurmOptions(tasks_per_node=4), 2)
    ray = RayOptions()
    assert with_ranks(ray, 1) is ray
    with pytest.raises(ValueError) as info:
        with_ranks(ray, 2)
    line = str(info.value)
    assert "launcher=ray runs each trial as one process" in line
    assert "launcher=slurm" in line and "train.nproc_per_node=2`" in line
    local = LocalOptions()  # a local trial starts its own ranks, one trial per job
    assert with_ranks(local, 2) is local
    with pytest.raises(ValueError, match="a trial that spans ranks takes its job alone"):
        with_ranks(LocalOptions(trials_per_job=4), 2)


def test_torchrun_variables_from_slurms(monkeypatch):
    for key in TORCHRUN:  # recorded by monkeypatch (set, then deleted): restored after the
        monkeypatch.setenv(key, "")  # test even though export_rank_env sets them in os.environ
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert export_rank_env() == {} and "RANK" not in os.environ  # one task: nothing
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "123456",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "13",
        "SLURM_LOCALID": "5",
        "MASTER_PORT": "29500",  # inherited from the submitting shell: every job would share it
        "RANK": "0",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    port = str(_port("123456"))
    expected = {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                "MASTER_ADDR": "gpu017", "MASTER_PORT": port}  # fmt: skip
    assert export_rank_env() == expected
    assert {k: os.environ[k] for k in TORCHRUN} == expected
    assert 20000 <= int(port) < 32768  # below the ephemeral ports
    assert _port("123457") != _port("123456")  # the next job: another port


def test_compose_launcher_of_train():
    opts = compose_launcher(["launcher=slurm", "launcher.tasks_per_node=2", "launcher.nodes=3"])
    assert isinstance(opts, SlurmOptions)
    assert (opts.nodes, opts.tasks_per_node, opts.cpus_per_task, opts.mem_gb) == (3, 2, 1, 2.0)
    assert compose_launcher(["launcher.nodes=2", "launcher=slurm"]).nodes == 2
    assert isinstance(compose_launcher([]), LocalOptions)
    with pytest.raises(ValueError, match="launcher=k8s: choose one of inline, local, ray, slurm"):
        compose_launcher(["launcher=k8s"])
    with pytest.raises(ValueError, match=r"launcher\.bogus is not an option of launcher=slurm"):
        compose_launcher(["launcher=slurm", "launcher.bogus=1"])


def _train(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "windtunnel", "train", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=WAIT)


def test_train_refuses_ranks_on_ray_and_counts_the_jobs_ranks(tmp_path):
    proc = _train("model=micro_xxs", "launcher=ray", "train.nproc_per_node=2")
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "launcher=ray runs each trial as one process" in line and "launcher=slurm" in line
    full = ("launcher=slurm", "launcher.nodes=16", "launcher.gpus_per_node=8")
    proc = _train("--dry-run", "model=minicpm_2p4b", "optim.batch_size=512", *full)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 128


# --- on the SLURM cluster ---------------------------------------------------------------------------
def _slurm(root: Path, **options):
    # timeout_min > 10: submitit counts any SIGUSR2 within 10 min of a shorter limit as a timeout
    kw = {"cpus_per_task": 1, "mem_gb": 2, "tasks_per_node": 2, **options}
    return make_launcher(name="slurm", folder=str(root), timeout_min=30, poll_interval_s=0.5, **kw)


def _rank_env() -> dict:
    """Runs in each task: what the trial sees."""
    import os

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ.get(k) for k in (*keys, "SLURM_JOB_ID")}


def _rank_1_fails() -> str:
    """Rank 1 raises at once; rank 0 would wait for it for ever (as in a collective)."""
    import os
    import time

    if os.environ["RANK"] == "1":
        raise ValueError("rank 1 broke")
    time.sleep(WAIT)
    return "rank 0 should have been stopped"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny proxy with two decay branches on one local process."""
    tmp = tmp_path_factory.mktemp("one")
    proc = _train(*tiny_overrides(tmp, *BRANCHED, "name=ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "ref"


@pytest.mark.integration
def test_each_task_is_a_rank_and_the_job_returns_rank_0s(slurm_cluster, submitit_root):
    job = _slurm(submitit_root, job_name="wt-ranks-env").submit(_rank_env)
    rank0 = job.result(timeout=WAIT)
    both = job.submitit_job.results()
    port = str(_port(rank0["SLURM_JOB_ID"]))
    assert both[0] == rank0
    for rank, env in enumerate(both):
        assert env == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": port,
                       "SLURM_JOB_ID": rank0["SLURM_JOB_ID"]}  # fmt: skip
    script = (job.paths.folder / f"{job.job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--kill-on-bad-exit=1" in script


@pytest.mark.integration
def test_a_rank_that_raises_ends_the_job_with_its_error(slurm_cluster, submitit_root):
    t0 = time.monotonic()
    job = _slurm(submitit_root, job_name="wt-ranks-fail").submit(_rank_1_fails)
    with pytest.raises(TrialError) as info:
        job.result(timeout=WAIT)
    elapsed = time.monotonic() - t0
    assert info.value.exc_type == "ValueError"
    assert "rank 1 broke (rank 1 of 2; srun stopped the others)" in info.value.reason
    assert elapsed < 60, f"rank 0 was left running for {elapsed:.0f} s"
    print(f"\na failing rank ended its 2-task job in {elapsed:.1f} s")


@pytest.mark.integration
def test_two_task_job_trains_the_single_process_curve(slurm_cluster, tmp_path, reference):
    args = [
        *tiny_overrides(tmp_path, *BRANCHED, "name=ref"),
        "launcher=slurm",
        "launcher.tasks_per_node=2",
        "launcher.cpus_per_task=1",
        "launcher.timeout_min=30",
        "launcher.poll_interval_s=0.5",
        f"launcher.folder={tmp_path}/submitit",
    ]
    t0 = time.monotonic()
    proc = _train(*args)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [x for x in proc.stderr.splitlines() if x.startswith("submitted job ")]
    assert len(said) == 1 and "(2 ranks on 1 node(s)); log: " in said[0], proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "finished" and [p["D"] for p in result["branches"]] == [6144, 12288]
    run = tmp_path / "runs" / "ref"
    assert_same_curves(run, reference, RTOL)
    for journal in run.rglob("journal.jsonl"):  # rank 0 alone records
        assert set(journal_counts(journal).values()) == {1}, journal
    for name in ("trunk", "fork-6144", "fork-12288"):
        assert checkpoint.read_meta(run / "ckpt" / name)["world_size"] == 2
    (folder,) = (tmp_path / "submitit").iterdir()
    job_id = said[0].split()[2]
    assert {p.name for p in folder.glob(f"{job_id}_*_result.pkl")} == {
        f"{job_id}_0_result.pkl",
        f"{job_id}_1_result.pkl",
    }
    print(f"\n2-rank run through SLURM: {elapsed:.1f} s end to end")


@pytest.mark.integration
def test_sweep_of_two_rank_trials_records_one_run_per_trial(slurm_cluster, mlflow_server, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from windtunnel.sweep import load_sweep
    from windtunnel.sweep.driver import storage_url
    from windtunnel.sweep.trial import open_storage

    name = f"ranks-{uuid.uuid4().hex[:6]}"
    experiment = f"wt-ranks-{name}"
    run = [o for o in tiny_overrides(tmp_path, "train.tokens=12288") if o != "tracker=jsonl"]
    args = [
        f"sweep.dir={tmp_path}/sweeps",
        f"sweep.name={name}",
        "sweep.n_trials=2",
        "sweep.parallelism=2",  # the second job waits for the node's 2 CPUs
        "sweep.pruner.kind=none",
        "launcher=slurm",
        "launcher.tasks_per_node=2",
        "launcher.cpus_per_task=1",
        "launcher.mem_gb=1",
        "launcher.timeout_min=30",
        f"launcher.folder={tmp_path}/submitit",
        "launcher.poll_interval_s=0.5",
        *run,
        "tracker=mlflow",
        f"tracker.uri={mlflow_server.uri}",
        f"tracker.experiment={experiment}",
        "train.eval_every_tokens=2048",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "windtunnel", "sweep", str(SMOKE), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["n_trials"], summary["n_complete"], summary["n_failed"]) == (2, 2, 0)

    # the study: each trial told once, from rank 0's result, with its reported curve
    spec = load_sweep(SMOKE, args)
    study = optuna.load_study(study_name=name, storage=open_storage(storage_url(spec)))
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.user_attrs["wt.attempts"] == 1 and t.intermediate_values for t in trials)
    # MLflow: the parent and exactly one run per trial (not one per rank)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("wt.kind") == "sweep"]
    recorded = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in recorded) == [0, 1]
    assert {r.info.run_id for r in recorded} == {t.user_attrs["run_id"] for t in trials}
    for r in recorded:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        history = client.get_metric_history(r.info.run_id, "train/loss")
        assert len(history) == len({m.step for m in history}), "a point was logged twice"
    for t in trials:  # each trial ran on 2 ranks
        run_dir = tmp_path / "sweeps" / name / "runs" / f"{name}-t{t.number:04d}"
        assert checkpoint.read_meta(run_dir / "ckpt" / "main")["world_size"] == 2
        assert set(journal_counts(run_dir / "journal.jsonl").values()) == {1}
    print(f"\nsweep of 2 two-rank trials on SLURM: {elapsed:.1f} s end to end")


# --- preemption of a 2-task job ---------------------------------------------------------------------
LONG = ("train.tokens=76800", "train.eval_every_tokens=6400", "optim.lr=0.01")
PREEMPT_AT = 75  # steps: preempt once a checkpoint this far exists (300 steps in all)


def _ckpt_step(path: Path) -> int:
    try:
        return int(checkpoint.read_meta(path)["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _sacct_states(job_id: str) -> list[str]:
    """The job's states, requeued incarnations included, once accounting says COMPLETED."""
    cmd = ["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "State"]
    deadline = time.monotonic() + WAIT
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
        states = [line.split()[0] for line in out.splitlines() if line.strip()]
        if states and states[-1] == "COMPLETED":
            return states
        assert time.monotonic() < deadline, states
        time.sleep(0.5)


@pytest.mark.integration
def test_preempted_two_task_job_is_requeued_and_resumes_the_curve(
    slurm_cluster, submitit_root, tmp_path
):
    """Both tasks get SIGUSR2, stop at the same step and checkpoint; task 0 requeues the job; the
    requeued job resumes on 2 ranks and ends with the uninterrupted 2-rank curve, bit for bit."""
    from windtunnel.compose import compose_run
    from windtunnel.train import train

    ref = _train(*tiny_overrides(tmp_path / "two", *LONG, "name=ref"), "train.nproc_per_node=2")
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = compose_run(tiny_overrides(tmp_path, *LONG, "name=preempted"))
    low = _slurm(submitit_root, partition="low", job_name="wt-ranks-low")
    t0 = time.monotonic()
    job = low.submit(train, cfg)
    ckpt = tmp_path / "runs" / "preempted" / "ckpt" / "main"
    deadline = time.monotonic() + WAIT
    while (at := _ckpt_step(ckpt)) < PREEMPT_AT:
        assert not job.done(), "the run ended before it could be preempted"
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    high = _slurm(submitit_root, partition="high", job_name="wt-urgent", tasks_per_node=1,
                  cpus_per_task=slurm_cluster["cpus"], mem_gb=1)  # fmt: skip
    assert high.submit(demo.add, 1, 2).result(timeout=WAIT) == 3  # preempts the 2-task job
    result = job.result(timeout=WAIT)
    elapsed = time.monotonic() - t0
    assert result.status == "finished"
    states = _sacct_states(job.job_id)
    assert any(s in ("PREEMPTED", "REQUEUED") for s in states[:-1]), states
    for task in job.submitit_job.task(0), job.submitit_job.task(1):  # both ranks were signalled
        log = task.paths.stderr.read_text()
        assert "Caught signal SIGUSR2" in log and "stopping at the next safe point" in log
    run = tmp_path / "runs" / "preempted"
    assert_same_curves(run, tmp_path / "two" / "runs" / "ref", rtol=0)
    events = [json.loads(x) for x in (run / "journal.jsonl").read_text().splitlines()]
    assert [e["ev"] for e in events].count("start") == 1 and any(
        e["ev"] == "resume" for e in events
    )
    assert set(journal_counts(run / "journal.jsonl").values()) == {1}
    assert checkpoint.read_meta(ckpt)["world_size"] == 2
    print(f"\n2-task job preempted at checkpoint step {at}, requeued, resumed: {elapsed:.1f} s")
