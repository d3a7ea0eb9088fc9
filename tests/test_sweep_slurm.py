"""Sweeps and training trials on a real single-node SLURM cluster (``scripts/slurm.sh up``).

* ``windtunnel sweep sweeps/smoke.yaml launcher=slurm`` runs every trial as a SLURM job through
  submitit, tracked in the real MLflow server (one parent run, one nested run per trial).
* A job array of training trials (``map_array``) with a parallelism cap.
* Real preemption of a *training* trial: a run in the `low` partition is preempted by a job in
  the `high` partition that needs the whole node; it gets SIGUSR2, submitit requeues it, it resumes
  from its last periodic checkpoint and ends with the loss curve of an uninterrupted run, point for
  point, as ONE tracked run. Once through the launcher (with proof that the second start resumed
  from a checkpoint) and once inside a sweep (the same Optuna trial, not a retry).
* The per-trial orchestration overhead on SLURM (launch + tracking as a share of trial time);
  ``WINDTUNNEL_OVERHEAD_TOKENS=3000000`` makes it a ~60 s trial.
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
from helpers import journal_counts, journal_metrics, tiny_overrides

from windtunnel.compose import compose_run as compose
from windtunnel.launch import demo, make_launcher

pytest_plugins = ["fixtures_services", "fixtures_mlflow"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# The preempted trial's worker function below must run on the SLURM node without importing this
# test module: send this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 180  # seconds: upper bound for any one wait on the cluster
SMOKE = REPO / "sweeps" / "smoke.yaml"
# 2000 optimizer steps of the tiny proxy (~10 s on an idle core), evaluated and checkpointed
# every 100 steps: a preemption loses at most that much work.
LONG = ["train.tokens=512000", "train.eval_every_tokens=25600", "optim.lr=0.01"]
PREEMPT_AT = 400  # preempt once a checkpoint at this step or later exists
CURVES = ("train/loss", "lr", "val_loss", "val_bpb", "val_loss/prose", "val_loss/code")


# --- helpers --------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}


def _slurm(root: Path, **options):
    # timeout_min > 10: submitit counts any SIGUSR2 within 10 min of a shorter limit as a timeout;
    # one CPU per trial so that two trials share the 2-CPU node
    kw = {"cpus_per_task": 1, "mem_gb": 2, **options}
    return make_launcher(name="slurm", folder=str(root), timeout_min=30, poll_interval_s=0.5, **kw)


def _mlflow(tmp: Path, uri: str, experiment: str, *extra: str) -> list[str]:
    base = [o for o in tiny_overrides(tmp, *extra) if o != "tracker=jsonl"]
    return [*base, "tracker=mlflow", f"tracker.uri={uri}", f"tracker.experiment={experiment}"]


def _sacct(job_id: str, *fields: str) -> list[list[str]]:
    cmd = ["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", ",".join(fields)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def _sacct_until(job_id: str, ok, *fields: str) -> list[list[str]]:
    """Poll sacct until ``ok(rows)``: accounting lags the result files by a second or so."""
    deadline = time.monotonic() + WAIT
    while True:
        rows = _sacct(job_id, *fields)
        if rows and ok(rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def _ckpt_step(path: Path) -> int:
    from windtunnel import checkpoint

    try:
        return int(checkpoint.read_meta(path)["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _wait_ckpt(path: Path, at_least: int, alive=lambda: True) -> int:
    deadline = time.monotonic() + WAIT
    while True:
        step = _ckpt_step(path)
        if step >= at_least:
            return step
        assert alive(), "the trial ended before it could be preempted"
        assert time.monotonic() < deadline, f"{path} did not reach step {at_least}"
        time.sleep(0.2)


def _preempt(root: Path, cpus: int) -> tuple[float, float]:
    """A job in the `high` partition that needs every CPU of the node: preempts `low` jobs.
    Returns (wall-clock time it was submitted, seconds until it finished)."""
    high = _slurm(root, partition="high", job_name="wt-urgent", cpus_per_task=cpus, mem_gb=1)
    t0, wall = time.monotonic(), time.time()
    assert high.submit(demo.sleep_then, 1.0, "urgent").result(timeout=WAIT) == "urgent"
    return wall, time.monotonic() - t0


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_same_curve(journal: Path, reference: Path) -> None:
    a, b = journal_metrics(reference), journal_metrics(journal)
    assert set(CURVES) <= set(a) and set(b) == set(a)
    for name in a:  # every point of every metric, bit for bit (throughput: the same steps)
        if name.startswith("throughput/"):
            assert b[name].keys() == a[name].keys(), name
        else:
            assert b[name] == a[name], f"{name} differs from the uninterrupted run"
    counts = journal_counts(journal)
    assert max(counts.values()) == 1, "a metric point was journaled twice after the requeue"


def _assert_one_resumed_run(journal: Path, run_id: str) -> None:
    events = _events(journal)
    starts = [e for e in events if e["ev"] == "start"]
    assert len(starts) == 1, "the requeued job must continue the same tracked run"
    assert starts[0]["run_id"] == run_id
    assert any(e["ev"] == "resume" for e in events), "the requeued job did not resume the run"
    finish = [e for e in events if e["ev"] == "finish"]
    assert finish and finish[-1]["status"] == "FINISHED"


def _assert_preempted_in_sacct(job_id: str) -> None:
    rows = _sacct_until(job_id, lambda r: r[-1][0] == "COMPLETED", "State")
    assert any(r[0] in ("PREEMPTED", "REQUEUED") for r in rows[:-1]), rows


def _train_recording_starts(cfg, starts_file: str):
    """The trainer as a SLURM trial, noting at each start of the job the step of the checkpoint it
    resumes from (runs on the node; no ``assert`` here: pytest rewrites them)."""
    import json
    import os
    import time

    from windtunnel.train import Trainer

    trainer = Trainer(cfg)
    step = max(0, _ckpt_step(trainer.dir / "ckpt" / "main"))
    with open(starts_file, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "ckpt_step": step, "t": time.time()}) + "\n")
    return trainer.run()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted LONG run (a local process, started once, awaited when first needed)."""
    tmp = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "windtunnel", "train", *tiny_overrides(tmp, *LONG, "name=ref")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got: dict = {}

    def wait() -> dict:
        if not got:
            out, err = proc.communicate(timeout=WAIT)
            assert proc.returncode == 0, err.decode()[-2000:]
            got.update(json.loads(out.decode().strip().splitlines()[-1]))
            got["journal"] = tmp / "runs" / "ref" / "journal.jsonl"
        return got

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# --- 1. a sweep through submitit on SLURM ----------------------------------------------------------
def test_smoke_sweep_runs_every_trial_as_a_slurm_job(slurm_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    name = f"slurm-{uuid.uuid4().hex[:6]}"
    experiment = f"wt-sweep-{name}"
    args = [
        f"sweep.dir={tmp_path}/sweeps",
        f"sweep.name={name}",
        "sweep.n_trials=4",
        "sweep.parallelism=2",
        "launcher=slurm",
        "launcher.partition=low",
        "launcher.cpus_per_task=1",
        "launcher.mem_gb=2",
        f"launcher.job_name=wt-{name}",
        f"launcher.folder={tmp_path}/submitit",
        "launcher.poll_interval_s=0.5",
        *_mlflow(tmp_path, mlflow_server.uri, experiment, "train.tokens=12288"),
        "train.eval_every_tokens=2048",
    ]
    cmd = [sys.executable, "-m", "windtunnel", "sweep", str(SMOKE), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=WAIT)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["study"] == name and summary["n_trials"] == 4
    assert summary["n_complete"] + summary["n_pruned"] + summary["n_failed"] == 4
    assert summary["n_complete"] >= 1 and summary["best_value"] is not None
    assert set(summary["best_params"]) == {"lr"}
    for number, reason in summary["failures"].items():
        assert reason, f"trial {number} failed without a reason"

    # every trial ran as a SLURM job (one submitit folder, 4 jobs, all COMPLETED)
    (folder,) = (tmp_path / "submitit").iterdir()
    job_ids = sorted({p.name.split("_")[0] for p in folder.glob("*_submission.sh")})
    assert len(job_ids) == 4
    for job_id in job_ids:
        _sacct_until(job_id, lambda r: r[-1][0] == "COMPLETED", "State")

    # MLflow: the sweep's parent run and one nested run per trial, tagged with study and trial
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("wt.kind") == "sweep"]
    assert parent.info.run_id == summary["parent_run_id"]
    trials = [r for r in runs if r.data.tags.get("optuna.trial") is not None]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == [0, 1, 2, 3]
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["optuna.study"] == name
    print(f"\nslurm smoke sweep: 4 trials, parallelism 2, {elapsed:.1f} s end to end")


# --- 1b. a job array of training trials ------------------------------------------------------------
def test_job_array_of_training_trials(slurm_cluster, submitit_root, tmp_path):
    from windtunnel.train import train

    lrs = [0.003, 0.01, 0.03]
    cfgs = [
        compose(tiny_overrides(tmp_path, "train.tokens=12288", f"optim.lr={lr}", f"name=a{i}"))
        for i, lr in enumerate(lrs)
    ]
    launcher = _slurm(submitit_root, job_name="wt-train-array", array_parallelism=2)
    t0 = time.monotonic()
    jobs = launcher.map_array(train, cfgs)
    results = [j.result(timeout=WAIT) for j in jobs]
    elapsed = time.monotonic() - t0
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    assert "#SBATCH --array=0-2%2" in (launcher.folder / f"{array_id}_submission.sh").read_text()
    assert [r.status for r in results] == ["finished"] * 3
    assert all(r.val_loss < r.initial_val_loss for r in results)
    assert len({r.run_id for r in results}) == 3 and len({r.val_loss for r in results}) == 3
    for i, r in enumerate(results):
        assert r.run_dir == str(tmp_path / "runs" / f"a{i}")
        assert json.loads((Path(r.run_dir) / "result.json").read_text())["val_loss"] == r.val_loss
    print(f"\nslurm job array: 3 training trials in {elapsed:.1f} s")


# --- 2. real preemption of a training trial --------------------------------------------------------
def test_preempted_training_trial_resumes_with_the_same_curve_and_run(
    slurm_cluster, submitit_root, mlflow_server, tmp_path, reference
):
    from mlflow.tracking import MlflowClient

    experiment = f"wt-preempt-{uuid.uuid4().hex[:6]}"
    cfg = compose(_mlflow(tmp_path, mlflow_server.uri, experiment, *LONG, "name=preempted"))
    run_dir = tmp_path / "runs" / "preempted"
    starts = tmp_path / "starts.jsonl"
    low = _slurm(submitit_root, partition="low", job_name="wt-train-low")
    t0 = time.monotonic()
    job = low.submit(_train_recording_starts, cfg, str(starts))
    at = _wait_ckpt(run_dir / "ckpt" / "main", PREEMPT_AT, alive=lambda: not job.done())
    t_high, high_s = _preempt(submitit_root, slurm_cluster["cpus"])
    result = job.result(timeout=WAIT)
    t_end = time.monotonic()

    assert result.status == "finished"
    ref = reference()
    assert result.val_loss == ref["val_loss"] and result.val_bpb == ref["val_bpb"]
    # preempted once, and the second start resumed from a checkpoint, not from scratch
    lines = [json.loads(line) for line in starts.read_text().splitlines()]
    # (more than one requeue is possible when other jobs share the cluster: each resumes)
    assert len(lines) >= 2 and lines[0]["ckpt_step"] == 0, lines
    assert all(x["ckpt_step"] > 0 for x in lines[1:]) and lines[-1]["ckpt_step"] >= at, lines
    log = (low.folder / f"{job.job_id}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in log and "preempted" in log
    _assert_preempted_in_sacct(job.job_id)
    # the same curve as the uninterrupted run, as one run in the journal and in MLflow
    journal = run_dir / "journal.jsonl"
    _assert_same_curve(journal, ref["journal"])
    _assert_one_resumed_run(journal, result.run_id)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == sorted(
        journal_metrics(ref["journal"])["train/loss"].items()
    )
    restart = lines[1]["t"] - t_high
    print(
        f"\npreempted training trial: checkpoint at step {at} when preempted; high job "
        f"{high_s:.1f} s; trial restarted {restart:.1f} s after the preemption "
        f"(resumed from step {lines[-1]['ckpt_step']}); {t_end - t0:.1f} s end to end "
        f"(uninterrupted: {ref['seconds']:.1f} s of training)"
    )


def test_preempted_sweep_trial_is_requeued_as_the_same_trial(slurm_cluster, tmp_path, reference):
    """Inside a sweep: the preempted job is requeued by SLURM (not retried by the driver), so the
    Optuna trial, its run folder and its tracked run stay the same."""
    import optuna

    from windtunnel.sweep import load_sweep
    from windtunnel.sweep.driver import storage_url
    from windtunnel.sweep.trial import open_storage

    name = f"preempt-{uuid.uuid4().hex[:6]}"
    args = [
        f"sweep.dir={tmp_path}/sweeps",
        f"sweep.name={name}",
        "sweep.n_trials=1",
        "sweep.parallelism=1",
        "sweep.sampler.kind=grid",
        "sweep.space.lr.grid=[0.01]",
        "sweep.pruner.kind=none",
        "launcher=slurm",
        "launcher.partition=low",
        "launcher.cpus_per_task=1",
        "launcher.mem_gb=2",
        f"launcher.folder={tmp_path}/submitit",
        "launcher.poll_interval_s=0.5",
        *tiny_overrides(tmp_path, *LONG),
    ]
    cmd = [sys.executable, "-m", "windtunnel", "sweep", str(SMOKE), *args]
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        run_dir = tmp_path / "sweeps" / name / "runs" / f"{name}-t0000"
        _wait_ckpt(run_dir / "ckpt" / "main", PREEMPT_AT, alive=lambda: proc.poll() is None)
        _preempt(tmp_path / "urgent", slurm_cluster["cpus"])
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["n_trials"], summary["n_complete"], summary["n_failed"]) == (1, 1, 0)

    spec = load_sweep(SMOKE, args)
    (trial,) = optuna.load_study(study_name=name, storage=open_storage(storage_url(spec))).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["wt.attempts"] == 1, "requeued by SLURM, not resubmitted"
    ref = reference()
    assert trial.value == ref["val_bpb"]
    (folder,) = (tmp_path / "submitit").iterdir()
    (job_id,) = {p.name.split("_")[0] for p in folder.glob("*_submission.sh")}
    _assert_preempted_in_sacct(job_id)
    journal = run_dir / "journal.jsonl"
    _assert_same_curve(journal, ref["journal"])
    _assert_one_resumed_run(journal, trial.user_attrs["run_id"])


# --- 3. per-trial orchestration overhead -----------------------------------------------------------
class _Timed:
    """A tracker (or run) proxy adding the seconds spent in its calls to ``acc[name]``."""

    def __init__(self, obj, acc: dict) -> None:
        self._obj, self._acc = obj, acc

    def __getattr__(self, name: str):
        import time

        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                out = attr(*args, **kwargs)
            finally:
                self._acc[name] = self._acc.get(name, 0.0) + time.perf_counter() - t
            return _Timed(out, self._acc) if name == "start_run" else out

        return call


def _timed_train(cfg) -> dict:
    """The trainer as a SLURM trial, timing its phases and its tracker calls (runs on the node)."""
    import time

    from windtunnel.tracking import open_tracker
    from windtunnel.train import Trainer

    entered = time.time()
    acc: dict = {}
    tracker = _Timed(open_tracker(cfg.tracker), acc)
    trainer = Trainer(cfg, tracker=tracker)
    built = time.time()
    result = trainer.run()
    return {"result": result, "entered": entered, "built": built, "returned": time.time(),
            "tracking": acc}  # fmt: skip


def test_orchestration_overhead_of_a_slurm_trial(
    slurm_cluster, submitit_root, mlflow_server, tmp_path
):
    """Where a SLURM trial's wall time goes: submit -> the worker runs our function (sbatch,
    scheduling, interpreter start, imports, unpickling), building the trainer (corpus, model),
    training (of which: calls into the MLflow tracker), and the result reaching the launcher."""
    import windtunnel.train  # noqa: F401 - unpickling the result would import torch: not per trial

    tokens = int(os.environ.get("WINDTUNNEL_OVERHEAD_TOKENS", "128000"))
    launcher = _slurm(submitit_root, job_name="wt-overhead")
    cfg = compose(_mlflow(tmp_path, mlflow_server.uri, "wt-overhead", f"train.tokens={tokens}"))
    t0 = time.time()
    job = launcher.submit(_timed_train, cfg)
    out = job.result(timeout=WAIT)
    wall = time.time() - t0
    pickled = job.paths.result_pickle.stat().st_mtime
    result = out["result"]
    assert result.status == "finished"
    launch = out["entered"] - t0
    build = out["built"] - out["entered"]
    train_s = out["returned"] - out["built"]
    back = wall - (out["returned"] - t0)
    tracking = sum(out["tracking"].values())
    share = (launch + back + tracking) / wall
    print(
        f"\nslurm trial overhead ({tokens} tokens): wall {wall:.1f} s = launch {launch:.2f} s "
        f"+ trainer setup {build:.2f} s + train {train_s:.1f} s (tracking {tracking:.2f} s) "
        f"+ result back {back:.2f} s (written {pickled - out['returned']:.2f} s after the trial "
        f"returned); launch + tracking + result: {100 * share:.1f}% of the trial "
        f"({100 * (share * wall + build) / wall:.1f}% counting the trainer setup); tracker calls: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(out["tracking"].items()))
    )
    assert 0 < tracking < train_s and launch < 60 and back < 10
