"""Run table from CSV/parquet and from MLflow (a local SQLite store in a temp folder)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling import DataModelLaw, InputError, fit_data_model
from windtunnel.scaling.synthetic import log_points_to_mlflow, synthetic_points
from windtunnel.scaling.table import load_table, runs_to_table, tracking_uri

LAW = DataModelLaw(E=1.6, A=350.0, B=900.0, alpha=0.32, beta=0.3)


def test_csv_and_parquet_with_column_mapping(tmp_path):
    df = synthetic_points(LAW, np.geomspace(1e7, 1e9, 4))
    raw = df.rename(columns={"N": "Model Size", "C": "Training FLOP"}).drop(columns="D")
    raw.to_csv(tmp_path / "t.csv", index=False)
    raw.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        t = load_table(tmp_path / name, columns={"N": "Model Size", "C": "Training FLOP"})
        assert np.allclose(t["D"], df["D"])  # D = C / (6N)
    # integer columns: C = 6ND must not overflow int64
    big = pd.DataFrame({"N": [10**9, 2 * 10**9], "D": [2 * 10**10, 4 * 10**10], "loss": [2.5, 2.4]})
    assert (load_table(big)["C"] > 1e20).all()
    with pytest.raises(InputError, match="no such file"):
        load_table(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="lacks"):
        load_table(tmp_path / "t.csv", columns={"N": "params"})


def test_runs_to_table_follows_the_trainer_contract():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "status": ["FINISHED", "FINISHED", "FAILED", "FINISHED"],
            "tags.wt.point": ["true", "true", "true", "false"],
            "tags.wt.failure": [None, None, "diverged", None],
            "tags.wt.stage": ["ladder"] * 4,
            "tags.wt.width": ["256", "512", "256", "256"],
            "tags.wt.batch_tokens": ["65536"] * 4,
            "metrics.N": [1e6, 4e6, 1e6, 1e6],
            "metrics.tokens": [2e7, 8e7, 2e7, 1e7],
            "metrics.flops": [1.2e14, 1.9e15, 1.2e14, 6e13],
            "metrics.val_loss": [3.1, 2.8, np.nan, 3.5],
            "metrics.val_bpb": [1.3, 1.2, np.nan, 1.5],
            "metrics.val_bpb/code": [1.0, 0.9, np.nan, 1.2],
            "params.optim.lr": ["0.01", "0.01", "0.01", "0.01"],
        }
    )
    t = runs_to_table(runs)
    assert list(t["run_id"]) == ["a", "b"]
    assert {
        "N",
        "D",
        "C",
        "loss",
        "bpb",
        "bpb/code",
        "lr",
        "width",
        "batch_tokens",
        "stage",
    } <= set(t)
    assert t["lr"].dtype.kind == "f" and t["width"].tolist() == [256, 512]


def test_tracking_uri_default(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == "http://127.0.0.1:5055"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert tracking_uri() == "sqlite:///x.db"
    assert tracking_uri("http://h:1") == "http://h:1"


def test_unreachable_server_is_a_clear_error(capsys):
    from windtunnel.scaling.cli import fit_main

    assert fit_main(["--input", "ladder", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the MLflow tracking server" in err and "Traceback" not in err


def test_fit_from_mlflow_experiment(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from windtunnel.scaling.cli import fit_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    df = synthetic_points(LAW, np.geomspace(1e7, 1e9, 4), (10, 20, 40), noise=0.002)
    art = (tmp_path / "artifacts").as_uri()
    exp_id = log_points_to_mlflow(df, "ladder-test", uri=uri, artifact_location=art)
    t = load_table("ladder-test", uri=uri)
    assert len(t) == len(df) and {"bpb/english", "lr", "width", "stage"} <= set(t)
    assert load_table(exp_id, uri=uri).shape == t.shape  # by id as well
    f = fit_data_model(t, target="bpb")
    assert f.alpha == pytest.approx(0.32, abs=0.06)
    rc = fit_main(["--input", "ladder-test", "--tracking-uri", uri, "--target", "bpb",
                   "--bootstrap", "10", "--json", "--out", str(tmp_path / "fit")])  # fmt: skip
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["target"] == "bpb"
    # the fit and its plots were recorded in the experiment
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(s["mlflow_run_id"])
    assert run.data.tags["wt.kind"] == "fit" and "fit.alpha" in run.data.metrics
    assert len(load_table("ladder-test", uri=uri)) == len(df)  # the fit run is not a point
    assert any((tmp_path / "artifacts").rglob("fit.json"))
    assert fit_main(["--input", "no-such-exp", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err

    # loss curves (evaluation history) for the batch-size law
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from windtunnel.scaling.table import read_curves

    client = MlflowClient(tracking_uri=uri)
    bs_exp = client.create_experiment("bs-sweep", artifact_location=art)
    for b in (2**15, 2**17, 2**19):
        run = client.create_run(bs_exp, tags={"wt.batch_tokens": str(b), "wt.N": "1e6"})
        steps = range(1, 6)
        ms = [Metric("val_loss", 4.0 - 0.1 * s, 0, s) for s in steps]
        ms += [Metric("tokens", float(s * b), 0, s) for s in steps]
        client.log_batch(run.info.run_id, metrics=ms)
    curves = read_curves("bs-sweep", uri=uri)
    assert len(curves) == 15 and set(curves["batch_tokens"]) == {2**15, 2**17, 2**19}
    assert curves.loc[curves.batch_tokens == 2**15, "tokens"].max() == 5 * 2**15
