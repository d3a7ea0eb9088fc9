"""The trainer against a real MLflow server: what a user sees in the dashboard, and nothing
lost when the server is away (journal replay)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_overrides

from windtunnel.cli import main
from windtunnel.compose import compose_run as compose
from windtunnel.train import train

pytest_plugins = ["fixtures_mlflow"]
pytestmark = pytest.mark.integration


def _mlflow_overrides(tmp: Path, uri: str, *extra: str) -> list[str]:
    base = [o for o in tiny_overrides(tmp, *extra) if o != "tracker=jsonl"]
    return [*base, "tracker=mlflow", f"tracker.uri={uri}", "tracker.experiment=wt-train-tests"]


def test_branched_run_lands_in_mlflow_as_parent_and_points(tmp_path: Path, mlflow_server) -> None:
    from mlflow import MlflowClient

    cfg = compose(
        _mlflow_overrides(
            tmp_path, mlflow_server.uri, "train.branch_tokens=[4096,8192]", "stage=ladder"
        )
    )
    result = train(cfg)
    assert result.status == "finished" and result.tracking_uri == mlflow_server.uri
    assert "compareRunsMode=CHART" in result.dashboard
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(result.run_id)
    assert parent.data.tags["wt.kind"] == "trunk" and parent.data.tags["wt.stage"] == "ladder"
    assert parent.data.params["optim.lr"] == "0.01"
    assert "provenance.git" in parent.data.params
    assert parent.info.status == "FINISHED"
    for point in result.points:
        child = client.get_run(point.run_id)
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == result.run_id
        assert tags["wt.point"] == "true" and tags["wt.N"] == str(result.N)
        assert child.data.metrics["val_loss"] == pytest.approx(point.val_loss)
        assert child.data.metrics["N"] == result.N
        assert child.data.metrics["tokens"] == point.tokens
        history = client.get_metric_history(point.run_id, "val_bpb")
        assert history[-1].step == point.tokens  # the x axis is tokens
    trunk_curve = client.get_metric_history(result.run_id, "train/loss")
    assert len(trunk_curve) > 5 and trunk_curve[0].value > trunk_curve[-1].value


def test_absent_server_loses_nothing_and_replay_delivers(
    tmp_path: Path, mlflow_server, capsys
) -> None:
    from fixtures_mlflow import free_port
    from mlflow import MlflowClient

    dead = f"http://127.0.0.1:{free_port()}"
    result = train(compose(_mlflow_overrides(tmp_path, dead, "train.tokens=8192", "name=offline")))
    assert result.status == "finished"
    run_dir = Path(result.run_dir)
    assert main(["replay", "--path", str(run_dir), "--tracking-uri", mlflow_server.uri]) == 0
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("wt-train-tests").experiment_id],
        filter_string="tags.`wt.model` = 'micro_xxs' and attributes.run_name = 'offline'",
    )
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "val_loss")
    assert history[-1].value == pytest.approx(result.val_loss)
    # a second replay sends nothing twice
    assert main(["replay", "--path", str(run_dir), "--tracking-uri", mlflow_server.uri]) == 0
    assert len(client.get_metric_history(runs[0].info.run_id, "val_loss")) == len(history)


def test_fit_reads_the_trainers_points_from_mlflow(tmp_path: Path, mlflow_server, capsys) -> None:
    """Trainer → MLflow → `windtunnel fit`: the run table contract holds end to end."""
    import json

    experiment = "wt-ladder-e2e"
    for width in (16, 24, 32):
        overrides = _mlflow_overrides(
            tmp_path,
            mlflow_server.uri,
            f"model.d_model={width}",
            f"model.n_heads={width // 8}",
            "model.d_head=8",
            "train.branch_tokens=[4096,8192,16384]",
            "stage=ladder",
        )
        cfg = compose([*overrides, f"tracker.experiment={experiment}"])
        assert train(cfg).status == "finished"
    capsys.readouterr()
    code = main(
        [
            "fit",
            "--input",
            experiment,
            "--tracking-uri",
            mlflow_server.uri,
            "--target",
            "bpb",
            "--json",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0, out
    fit = json.loads(out)
    assert fit["n_points"] == 9
    assert fit["alpha"] > 0 and fit["beta"] > 0
