"""Sweeps: specs compose, the Optuna driver accounts for every trial, prunes, retries killed
jobs, and resumes a study without duplicating or losing trials."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import REPO
from helpers import local_sweep, tiny_overrides
from optuna.trial import TrialState

from windtunnel.sweep import Driver, load_sweep, run_sweep
from windtunnel.sweep.trial import open_storage

SPECS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_ready_spec_loads(path: Path) -> None:
    spec = load_sweep(path, [])
    assert spec.sweep.space and spec.sweep.n_trials >= 1
    from windtunnel.compose import compose_run as compose

    compose(spec.run)  # the base run composes


def test_overrides_go_to_the_spec_or_the_base_run() -> None:
    spec = load_sweep(
        REPO / "sweeps/smoke.yaml",
        ["sweep.n_trials=3", "launcher=slurm", "launcher.partition=gpu", "model=micro_s"],
    )
    assert spec.sweep.n_trials == 3
    assert spec.launcher.name == "slurm" and spec.launcher.partition == "gpu"
    assert spec.run[-1] == "model=micro_s"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.sampler.kind=annealing"], "sampler"),
        (["sweep.pruner.kind=oracle"], "pruner"),
        (["sweep.storage=sqlite:///x.db"], "SQLite"),
        (["sweep.space.lr.low=-1"], "log scale"),
    ],
)
def test_bad_specs_are_clear_errors(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec = load_sweep(REPO / "sweeps/smoke.yaml", [f"sweep.dir={tmp_path}", *overrides])
        Driver(spec)


def test_unknown_launcher_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"launcher\.partition is not an option of launcher=local"):
        load_sweep(
            REPO / "sweeps/smoke.yaml",
            [f"sweep.dir={tmp_path}", "launcher=local", "launcher.partition=gpu"],
        )


def _spec(tmp: Path, *overrides: str):
    base = [o for o in tiny_overrides(tmp, "train.tokens=12288", "train.eval_every_tokens=2048")]
    return load_sweep(
        REPO / "sweeps/smoke.yaml",
        [f"sweep.dir={tmp}/sweeps", "launcher=inline", "sweep.parallelism=1", *overrides, *base],
    )


def _study(spec) -> optuna.Study:
    from windtunnel.sweep.driver import storage_url

    return optuna.load_study(study_name=spec.sweep.name, storage=open_storage(storage_url(spec)))


def test_sweep_accounts_for_every_trial_and_resumes_by_name(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, "sweep.n_trials=3", "sweep.sampler.kind=random", "sweep.pruner.kind=none"
    )
    first = run_sweep(spec)
    assert (first.n_complete, first.n_pruned, first.n_failed) == (3, 0, 0)
    assert (
        first.best_value is not None
        and "lr" in first.best_params
        and first.best_overrides[0].startswith("optim.lr=")
    )
    # the same sweep, asked for more trials, continues the study: no duplicates, nothing lost
    again = run_sweep(
        _spec(tmp_path, "sweep.n_trials=5", "sweep.sampler.kind=random", "sweep.pruner.kind=none")
    )
    assert again.n_trials == 5 and again.n_complete == 5
    trials = _study(spec).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.user_attrs["wt.attempts"] == 1 for t in trials)
    runs = sorted(p.name for p in (tmp_path / "sweeps/smoke/runs").iterdir())
    assert runs == [f"smoke-t{i:04d}" for i in range(5)]
    for t in trials:  # each trial's result is its run's finished, decayed loss
        result = json.loads(
            (tmp_path / f"sweeps/smoke/runs/smoke-t{t.number:04d}/result.json").read_text()
        )
        assert result["val_bpb"] == pytest.approx(t.value)
        assert result["run_id"] == t.user_attrs["run_id"]


def test_bad_trials_are_pruned_and_diverged_ones_fail_with_a_reason(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        "sweep.n_trials=4",
        "sweep.sampler.kind=grid",
        "sweep.pruner.kind=median",
        "sweep.pruner.n_startup_trials=1",
        "sweep.pruner.n_warmup_evals=1",
        "sweep.space.lr.grid=[0.02,0.0001,10000.0,0.00002]",
        "optim.grad_clip=0",
    )
    summary = run_sweep(spec)
    trials = {round(t.params["lr"], 6): t for t in _study(spec).get_trials()}
    assert summary.n_trials == 4
    assert trials[0.02].state == TrialState.COMPLETE
    assert trials[10000.0].state == TrialState.FAIL
    assert "diverged" in trials[10000.0].user_attrs["fail_reason"]
    assert TrialState.PRUNED in {trials[0.0001].state, trials[0.00002].state}
    assert summary.n_complete + summary.n_pruned + summary.n_failed == 4


class _KillFirstWorker:
    """A sweep view that SIGKILLs the first trial's worker once it has checkpointed."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.killed = folder, False

    def update(self, study, active) -> None:
        for number, (handle, _) in active.items():
            ckpt = self.folder / "runs" / f"smoke-t{number:04d}" / "ckpt" / "main"
            if not self.killed and getattr(handle, "pid", None) and ckpt.exists():
                os.killpg(handle.pid, signal.SIGKILL)
                self.killed = True

    def close(self, study) -> None:
        pass


@pytest.mark.parametrize("retries", [1, 0])
def test_a_killed_job_is_retried_and_resumes_or_fails_with_the_reason(
    tmp_path: Path, retries: int
) -> None:
    spec = _spec(
        tmp_path,
        "launcher=local",
        "sweep.n_trials=1",
        f"sweep.max_retries={retries}",
        "sweep.pruner.kind=none",
        "train.tokens=98304",
    )
    view = _KillFirstWorker(spec.folder)
    from windtunnel.launch import make_launcher

    with make_launcher(spec.launcher) as launcher:
        summary = Driver(spec, view=view).run(launcher, poll_s=0.05)
    assert view.killed, "the trial finished before it could be killed"
    (trial,) = _study(spec).get_trials()
    assert trial.user_attrs["wt.attempts"] == 1 + retries
    if retries:
        assert trial.state == TrialState.COMPLETE and summary.n_complete == 1
    else:
        assert trial.state == TrialState.FAIL and "SIGKILL" in trial.user_attrs["fail_reason"]


def test_driver_killed_mid_sweep_continues_without_duplicates(tmp_path: Path) -> None:
    args, cmd, env = local_sweep(tmp_path, "train.tokens=24576")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "sweeps/smoke/optuna.journal"
    deadline = time.monotonic() + 180
    spec = load_sweep(REPO / "sweeps/smoke.yaml", args)
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(KeyError):  # the journal exists before the study is in it
            if journal.exists() and any(
                t.state == TrialState.COMPLETE for t in _study(spec).get_trials()
            ):
                break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.kill()
    proc.communicate()
    before = _study(spec).get_trials()
    assert any(t.state == TrialState.RUNNING for t in before) or len(before) < 4

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert out["n_trials"] == 4 and out["n_complete"] == 4
    trials = _study(spec).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({json.dumps(t.params) for t in trials}) == 4


def test_optuna_dashboard_reads_the_study(tmp_path: Path) -> None:
    """The sweep's journal storage is what `optuna-dashboard <journal>` serves."""
    import io
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    from windtunnel.sweep.driver import storage_url

    spec = _spec(
        tmp_path, "sweep.n_trials=2", "sweep.sampler.kind=random", "sweep.pruner.kind=none"
    )
    run_sweep(spec)
    app = wsgi(open_storage(storage_url(spec)))
    env: dict = {"PATH_INFO": "/api/studies", "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(env)
    status: list[str] = []
    body = b"".join(app(env, lambda s, h, *a: status.append(s)))
    assert status[0].startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in studies] == ["smoke"]
