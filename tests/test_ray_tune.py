"""The Ray Tune engine (``sweep.engine=ray``) on a real local Ray and a real MLflow server:
every trial accounted for, each one a nested MLflow run under the sweep's parent exactly as with
the Optuna engine, ASHA stops end runs as pruned, a finished sweep reruns without training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, skip_or_fail
from helpers import tiny_overrides

from windtunnel.sweep import load_sweep, run_sweep

pytest_plugins = ["fixtures_mlflow", "fixtures_services"]
pytestmark = pytest.mark.integration

# lr=1e-5 learns nothing (ASHA stops it at its first rung), lr=1e4 without clipping diverges
GRID = [0.02, 0.01, 0.00001, 10000.0]


def _args(tmp: Path, uri: str, *extra: str) -> list[str]:
    run = [o for o in tiny_overrides(tmp, "train.tokens=12288", "train.eval_every_tokens=2048")]
    return [
        f"sweep.dir={tmp}/sweeps",
        "sweep.engine=ray",
        "sweep.n_trials=4",
        "sweep.parallelism=2",
        *extra,
        *[o for o in run if o != "tracker=jsonl"],
        "tracker=mlflow",
        f"tracker.uri={uri}",
        f"tracker.experiment=wt-ray-{tmp.name}",
    ]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory, mlflow_server, ray_local) -> dict:
    """One sweep through the CLI: a 4-point lr grid, 2 at a time, ASHA after one evaluation;
    on the session's local Ray, joined as an existing cluster (``launcher.address``)."""
    import ray

    try:
        import ray.tune
    except ImportError as e:
        skip_or_fail(f"ray[tune] is not installed: {e}")
    tmp = tmp_path_factory.mktemp("raygrid")
    args = _args(
        tmp,
        mlflow_server.uri,
        "launcher=ray",
        f"launcher.address={ray.get_runtime_context().gcs_address}",
        "sweep.sampler.kind=grid",
        f"sweep.space.lr.grid=[{','.join(map(str, GRID))}]",
        "sweep.pruner.n_warmup_evals=1",
        "optim.grad_clip=0",
    )
    cmd = [sys.executable, "-m", "windtunnel", "sweep", str(REPO / "sweeps/smoke.yaml"), *args]
    env = {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return {
        "args": args,
        "out": json.loads(r.stdout.strip().splitlines()[-1]),
        "stderr": r.stderr,
        "seconds": time.monotonic() - t0,
        "uri": mlflow_server.uri,
    }


def test_cli_summary_accounts_for_every_trial(grid_sweep: dict) -> None:
    out = grid_sweep["out"]
    assert out["study"] == "smoke" and out["storage"].startswith("ray:")
    assert out["n_trials"] == 4
    # lr=1e-5 is always stopped at the first rung; of 0.02 and 0.01, which run side by side, the
    # one reaching the rung second is stopped if it is behind the first
    assert out["n_failed"] == 1 and out["n_pruned"] in (1, 2), out
    assert out["n_complete"] + out["n_pruned"] + out["n_failed"] == 4
    assert out["best_params"]["lr"] in (0.02, 0.01)
    assert out["best_overrides"] == [f"optim.lr={out['best_params']['lr']!r}"]
    assert "diverged" in out["failures"]["3"]  # the grid's 4th point: lr=1e4
    assert "trial 3 failed: diverged" in grid_sweep["stderr"]


def test_every_trial_is_a_nested_mlflow_run_of_the_sweep(grid_sweep: dict) -> None:
    from mlflow import MlflowClient

    out, client = grid_sweep["out"], MlflowClient(grid_sweep["uri"])
    parent = client.get_run(out["parent_run_id"])
    tags = parent.data.tags
    assert (tags["wt.kind"], tags["wt.sweep"], tags["wt.stage"]) == ("sweep", "smoke", "mup_search")
    assert tags["best.lr"] == str(out["best_params"]["lr"])
    assert tags["best.trial"] == str(out["best_trial"])
    assert parent.data.metrics["best_value"] == pytest.approx(out["best_value"])
    assert parent.data.metrics["n_pruned"] == out["n_pruned"] and parent.info.status == "FINISHED"

    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_number = {int(t.data.tags["optuna.trial"]): t for t in trials}
    assert sorted(by_number) == [0, 1, 2, 3]
    for number, run in by_number.items():
        t = run.data.tags
        assert t["wt.sweep"] == "smoke" and t["optuna.study"] == "smoke"
        assert run.info.run_name == f"smoke-t{number:04d}"
        assert float(run.data.params["optim.lr"]) == GRID[number]
    statuses = {n: r.info.status for n, r in by_number.items()}
    assert statuses[2] == "KILLED" and by_number[2].data.tags["wt.pruned"] == "true"
    assert statuses[3] == "FAILED" and "diverged" in by_number[3].data.tags["wt.failure"]
    assert sorted(statuses.values()).count("KILLED") == out["n_pruned"]
    assert sorted(statuses.values()).count("FINISHED") == out["n_complete"]
    for run in by_number.values():
        if run.info.status == "KILLED":
            assert run.data.tags["wt.pruned"] == "true"
    best = by_number[out["best_trial"]]
    assert best.data.metrics["val_bpb"] == pytest.approx(out["best_value"])
    # the pruned trial's curve ends at ASHA's first rung (one evaluation, 2048 tokens)
    history = client.get_metric_history(by_number[2].info.run_id, "val_bpb")
    assert [m.step for m in history] == [0, 2048]


def test_rerun_of_a_finished_ray_sweep_returns_its_results(grid_sweep: dict) -> None:
    spec = load_sweep(REPO / "sweeps/smoke.yaml", grid_sweep["args"])
    t0 = time.monotonic()
    again = run_sweep(spec)
    assert time.monotonic() - t0 < 5, "a finished sweep must not start Ray or train again"
    assert again.to_json() == {
        **grid_sweep["out"],
        "failures": {3: grid_sweep["out"]["failures"]["3"]},
    }
    more = load_sweep(REPO / "sweeps/smoke.yaml", [*grid_sweep["args"], "sweep.n_trials=5"])
    more.sweep.sampler.kind = "random"
    with pytest.raises(ValueError, match="cannot extend a finished experiment"):
        run_sweep(more)


def test_tpe_sweep_in_process(tmp_path: Path, mlflow_server, ray_local) -> None:
    """The spec's own sampler (TPE) and ASHA, from this process, on the Ray already running here
    (which the sweep must leave running)."""
    import ray

    spec = load_sweep(
        REPO / "sweeps/smoke.yaml", _args(tmp_path, mlflow_server.uri, "sweep.n_trials=2")
    )
    summary = run_sweep(spec)
    assert ray.is_initialized()
    assert summary.n_trials == 2
    assert summary.n_complete + summary.n_pruned + summary.n_failed == 2
    assert summary.n_complete >= 1 and summary.best_trial is not None
    assert 0.001 <= summary.best_params["lr"] <= 0.1
    runs = sorted(p.name for p in (spec.folder / "runs").iterdir())
    assert runs == ["smoke-t0000", "smoke-t0001"]
