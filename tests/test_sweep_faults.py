"""Nothing lost under load and faults: every trial accounted for in Optuna and MLflow with every
metric point present, also when the tracking server goes away mid-sweep."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import optuna
import pytest
from conftest import REPO
from helpers import journal_counts, tiny_overrides
from optuna.trial import TrialState

from windtunnel.sweep import load_sweep, run_sweep
from windtunnel.sweep.driver import storage_url
from windtunnel.sweep.trial import open_storage

pytest_plugins = ["fixtures_mlflow"]
pytestmark = pytest.mark.integration


def _spec(tmp: Path, uri: str, *extra: str):
    run = [
        o
        for o in tiny_overrides(tmp, "train.tokens=2048", "train.eval_every_tokens=512")
        if o != "tracker=jsonl"
    ]
    return load_sweep(
        REPO / "sweeps/smoke.yaml",
        [
            f"sweep.dir={tmp}/sweeps",
            "sweep.sampler.kind=random",
            "sweep.pruner.kind=median",
            "sweep.pruner.n_startup_trials=8",
            *extra,
            *run,
            "tracker=mlflow",
            f"tracker.uri={uri}",
            f"tracker.experiment=faults-{tmp.name}",
            "train.eval_tokens=256",
        ],
    )


def _check_everything_accounted(spec, uri: str) -> None:
    from mlflow import MlflowClient

    study = optuna.load_study(study_name=spec.sweep.name, storage=open_storage(storage_url(spec)))
    trials = study.get_trials()
    assert len(trials) == spec.sweep.n_trials
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL), t
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("fail_reason"), t.number
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"faults-{spec.folder.parents[1].name}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_trial = {r.data.tags.get("optuna.trial"): r for r in runs if "optuna.trial" in r.data.tags}
    parent = [r for r in runs if r.data.tags.get("wt.kind") == "sweep"]
    assert len(parent) == 1
    assert sorted(by_trial, key=int) == [str(t.number) for t in trials]
    for t in trials:
        run = by_trial[str(t.number)]
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        journal = spec.folder / "runs" / f"{spec.sweep.name}-t{t.number:04d}" / "journal.jsonl"
        expected: dict[str, int] = {}
        for (name, _step), n in journal_counts(journal).items():
            expected[name] = expected.get(name, 0) + n
        for name, n in expected.items():
            got = len(client.get_metric_history(run.info.run_id, name))
            assert got == n, (
                f"trial {t.number}: {name} has {got} points in MLflow, {n} in the journal"
            )


def test_eight_workers_sixty_four_trials_nothing_lost(tmp_path: Path, mlflow_server) -> None:
    spec = _spec(
        tmp_path,
        mlflow_server.uri,
        "launcher=local",
        "+launcher.max_workers=8",
        "launcher.oversubscribe=true",
        "sweep.n_trials=64",
        "sweep.parallelism=8",
        "sweep.threads_per_trial=1",
    )
    t0 = time.monotonic()
    summary = run_sweep(spec)
    print(
        f"64 trials × 8 workers: {time.monotonic() - t0:.1f} s; {json.dumps(summary.to_json())[:300]}"
    )
    assert summary.n_complete + summary.n_pruned + summary.n_failed == 64
    _check_everything_accounted(spec, mlflow_server.uri)


def test_server_away_mid_sweep_loses_no_metric_point(
    tmp_path: Path, mlflow_server, mlflow_proxy
) -> None:
    from windtunnel.tracking import replay_journal

    spec = _spec(
        tmp_path, mlflow_proxy.uri, "launcher=local", "sweep.n_trials=6", "sweep.parallelism=2"
    )
    outage = threading.Timer(4.0, mlflow_proxy.down)
    back = threading.Timer(12.0, mlflow_proxy.up)
    outage.start()
    back.start()
    try:
        summary = run_sweep(spec)
    finally:
        outage.cancel()
        back.cancel()
    assert summary.n_complete + summary.n_pruned + summary.n_failed == 6
    if not back.finished.is_set() or mlflow_proxy._listener is None:
        mlflow_proxy.up()
    replay_journal(spec.folder, mlflow_proxy.uri)  # what `windtunnel replay --path <sweep>` does
    _check_everything_accounted(spec, mlflow_server.uri)
