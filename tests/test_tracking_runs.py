"""windtunnel.tracking.runs: reading points and loss curves back from MLflow and recording fits;
over REST against a real server, and through mlflow's client for a SQLite store."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling import DataModelLaw, fit_data_model
from windtunnel.scaling.synthetic import synthetic_points
from windtunnel.scaling.table import load_table
from windtunnel.tracking import DEFAULT_URI, is_healthy, tracking_uri
from windtunnel.tracking.api import RestClient, kv, metric
from windtunnel.tracking.backend import probe
from windtunnel.tracking.runs import (
    RunsError,
    curves_table,
    log_points,
    runs_frame,
    runs_table,
    runs_to_table,
)

if TYPE_CHECKING:
    from fixtures_mlflow import MlflowServer

pytest_plugins = ["fixtures_mlflow"]

LAW = DataModelLaw(E=1.6, A=350.0, B=900.0, alpha=0.32, beta=0.3)


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
    assert list(runs_to_table(pd.DataFrame()).columns) == ["N", "D", "C", "loss", "bpb", "run_id"]


def test_tracking_uri_default(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == DEFAULT_URI == "http://127.0.0.1:5055"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert tracking_uri() == "sqlite:///x.db"
    assert tracking_uri("http://h:1") == "http://h:1"


def test_fit_help_names_the_default_uri():
    from windtunnel.cli.fit import _fit_parser

    assert DEFAULT_URI in _fit_parser().format_help()


@pytest.fixture
def http_answering() -> Iterator[dict[str, int]]:
    """A local HTTP server whose ``/health`` answers with ``status["code"]``."""
    status = {"code": 200}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    status["port"] = srv.server_address[1]
    try:
        yield status
    finally:
        srv.shutdown()
        srv.server_close()


def test_one_health_check(http_answering):
    uri = f"http://127.0.0.1:{http_answering['port']}"
    assert is_healthy(uri) and probe(uri)
    http_answering["code"] = 404  # answering, but not an MLflow server's /health
    assert not is_healthy(uri) and is_healthy(uri, strict=False) and probe(uri)
    http_answering["code"] = 503
    assert not is_healthy(uri, strict=False) and not probe(uri)
    assert is_healthy("sqlite:///x.db") and probe("file:///tmp/mlruns")


def test_unreachable_server_is_a_clear_error(capsys):
    from windtunnel.cli.fit import fit_main

    with pytest.raises(RunsError, match="cannot reach the MLflow tracking server"):
        runs_table("ladder", uri="http://127.0.0.1:9")
    assert fit_main(["--input", "ladder", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the MLflow tracking server" in err and "Traceback" not in err


@pytest.mark.integration
def test_ladder_read_back_from_a_real_server(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Points logged the way the trainer logs them are read back over REST (paged), fitted by
    `windtunnel fit`, whose fit run lands in the experiment without counting as a point."""
    from windtunnel.cli.fit import fit_main

    uri = mlflow_server.uri
    df = synthetic_points(LAW, np.geomspace(1e7, 1e9, 4), (10, 20, 40), noise=0.002)
    exp_id = log_points(df, "ladder-rest", uri=uri)
    t = runs_table("ladder-rest", uri=uri)
    assert len(t) == len(df) and {"bpb/english", "lr", "width", "stage", "run_id"} <= set(t)
    assert np.allclose(np.sort(t["loss"]), np.sort(df["loss"]))
    assert np.allclose(np.sort(t["C"]), np.sort(df["C"]))
    assert (t["stage"] == "ladder").all() and t["lr"].eq(0.01).all()
    assert runs_table(exp_id, uri=uri).shape == t.shape  # by id as well
    # paging: 12 runs in pages of 5
    client = RestClient(uri)
    assert len(list(client.search_runs([exp_id], page_size=5))) == len(df)
    fit = fit_data_model(load_table(t), target="bpb")
    assert fit.alpha == pytest.approx(0.32, abs=0.06)
    with pytest.raises(RunsError, match="no MLflow experiment named or numbered"):
        runs_table("no-such-experiment", uri=uri)

    out = tmp_path / "fit"
    rc = fit_main(["--input", "ladder-rest", "--tracking-uri", uri, "--target", "bpb",
                   "--bootstrap", "10", "--json", "--out", str(out)])  # fmt: skip
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = runs_frame("ladder-rest", uri=uri, filter_string="tags.`wt.kind` = 'fit'")
    (fit_run,) = runs.to_dict("records")
    assert fit_run["run_id"] == s["mlflow_run_id"] and fit_run["status"] == "FINISHED"
    assert fit_run["metrics.fit.alpha"] == pytest.approx(s["alpha"])
    art = client.artifact_dir(s["mlflow_run_id"])
    assert art is not None and (art / "fit" / "fit.json").exists()
    assert len(runs_table("ladder-rest", uri=uri)) == len(df)  # the fit run is not a point

    # loss curves, with a metric history read in pages
    bs_exp = client.create_experiment("bs-sweep-rest")
    for b in (2**15, 2**17, 2**19):
        tags = {"wt.batch_tokens": str(b), "wt.N": "1e6"}
        run_id = client.create_run(bs_exp, start_time=None, tags=tags, run_name=f"bs{b}")
        steps = range(1, 6)
        ms = [metric("val_loss", 4.0 - 0.1 * s, 0, s) for s in steps]
        ms += [metric("tokens", float(s * b), 0, s) for s in steps]
        client.log_batch(run_id, metrics=ms, params=kv({"optim.lr": 0.01}))
    assert len(client.get_metric_history(run_id, "val_loss", page_size=2)) == 5
    curves = curves_table("bs-sweep-rest", uri=uri)
    assert len(curves) == 15 and set(curves["batch_tokens"]) == {2**15, 2**17, 2**19}
    assert curves.loc[curves.batch_tokens == 2**15, "tokens"].max() == 5 * 2**15
    assert (curves["N"] == 1e6).all()


READ_WITHOUT_MLFLOW = """
import sys
from windtunnel.tracking.runs import curves_table, runs_table
assert len(runs_table(sys.argv[2], uri=sys.argv[1])) > 0
curves_table(sys.argv[2], uri=sys.argv[1])
assert not [m for m in sys.modules if m.split(".")[0] == "mlflow"], "mlflow was imported"
"""


@pytest.mark.integration
def test_reading_over_http_does_not_import_mlflow(mlflow_server: MlflowServer) -> None:
    df = synthetic_points(LAW, np.geomspace(1e7, 1e8, 2), (10, 20))
    log_points(df, "ladder-no-import", uri=mlflow_server.uri)
    r = subprocess.run(
        [sys.executable, "-c", READ_WITHOUT_MLFLOW, mlflow_server.uri, "ladder-no-import"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def test_sqlite_store_through_mlflows_client(tmp_path, capsys):
    """A tracking URI that is not a server (here SQLite) is read and written through mlflow's
    own client, with the same results."""
    pytest.importorskip("mlflow")
    from windtunnel.cli.fit import fit_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    df = synthetic_points(LAW, np.geomspace(1e7, 1e9, 4), (10, 20, 40), noise=0.002)
    art = (tmp_path / "artifacts").as_uri()
    exp_id = log_points(df, "ladder-test", uri=uri, artifact_location=art)
    t = runs_table("ladder-test", uri=uri)
    assert len(t) == len(df) and {"bpb/english", "lr", "width", "stage"} <= set(t)
    assert runs_table(exp_id, uri=uri).shape == t.shape  # by id as well
    rc = fit_main(["--input", "ladder-test", "--tracking-uri", uri, "--target", "bpb",
                   "--bootstrap", "10", "--json", "--out", str(tmp_path / "fit")])  # fmt: skip
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["target"] == "bpb"
    # the fit and its plots were recorded in the experiment
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(s["mlflow_run_id"])
    assert run.data.tags["wt.kind"] == "fit" and "fit.alpha" in run.data.metrics
    assert len(runs_table("ladder-test", uri=uri)) == len(df)  # the fit run is not a point
    assert any((tmp_path / "artifacts").rglob("fit.json"))
    assert fit_main(["--input", "no-such-exp", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err

    # loss curves (evaluation history) for the batch-size law
    bs_exp = client.create_experiment("bs-sweep", artifact_location=art)
    for b in (2**15, 2**17, 2**19):
        run = client.create_run(bs_exp, tags={"wt.batch_tokens": str(b), "wt.N": "1e6"})
        steps = range(1, 6)
        ms = [Metric("val_loss", 4.0 - 0.1 * s, 0, s) for s in steps]
        ms += [Metric("tokens", float(s * b), 0, s) for s in steps]
        client.log_batch(run.info.run_id, metrics=ms)
    curves = curves_table("bs-sweep", uri=uri)
    assert len(curves) == 15 and set(curves["batch_tokens"]) == {2**15, 2**17, 2**19}
    assert curves.loc[curves.batch_tokens == 2**15, "tokens"].max() == 5 * 2**15
