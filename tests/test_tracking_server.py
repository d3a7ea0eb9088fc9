"""The local MLflow server windtunnel starts and reuses (windtunnel.tracking.server): one server
per store under a file lock, failures that point at the log, and its dashboard addresses."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from windtunnel.config import TrackerConfig
from windtunnel.tracking import (
    ServerError,
    ensure_server,
    mlflow_ui_url,
    server_status,
    stop_server,
)
from windtunnel.tracking import server as server_mod

if TYPE_CHECKING:
    from fixtures_mlflow import MlflowServer

pytest_plugins = ["fixtures_mlflow"]


def free_port() -> int:
    from fixtures_mlflow import free_port  # imported by pytest as a plugin (asserts rewritten)

    return free_port()


def test_mlflow_ui_url() -> None:
    assert (
        mlflow_ui_url("http://h:1/", "3") == "http://h:1/#/experiments/3/runs?compareRunsMode=CHART"
    )
    assert (
        mlflow_ui_url("http://h:1", "3", "ab") == "http://h:1/#/experiments/3/runs/ab/model-metrics"
    )


def test_ensure_server_with_uri_starts_nothing(tmp_path: Path) -> None:
    cfg = TrackerConfig(uri="http://mlflow.example:5000", home=str(tmp_path / "home"))
    assert ensure_server(cfg) == "http://mlflow.example:5000"
    assert not (tmp_path / "home").exists()


def test_ensure_server_failure_points_at_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = [sys.executable, "-c", "print('cannot bind: address in use'); raise SystemExit(3)"]
    monkeypatch.setattr(server_mod, "server_command", lambda home, port: fake)
    cfg = TrackerConfig(home=str(tmp_path / "home"), port=free_port())
    with pytest.raises(ServerError) as err:
        ensure_server(cfg, timeout_s=20)
    assert "mlflow-server.log" in str(err.value) and "address in use" in str(err.value)
    assert not stop_server(tmp_path / "home")  # nothing left running
    assert server_status(tmp_path / "home", cfg.port).pid is None


FAKE_SERVER = """
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
time.sleep(1.0)  # slow to come up, like the real one
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_ensure_server_concurrent_callers_start_one_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers at once (the file lock): one server is started, both get its URI; it is
    detached, visible to server_status, and stop_server ends it."""
    home = tmp_path / "home"
    monkeypatch.setattr(
        server_mod,
        "server_command",
        lambda h, p: [sys.executable, "-c", FAKE_SERVER, "mlflow", str(h), "--port", str(p)],
    )
    cfg = TrackerConfig(home=str(home), port=free_port())
    with ThreadPoolExecutor(2) as pool:
        uris = list(pool.map(lambda _: ensure_server(cfg, timeout_s=30), range(2)))
    try:
        assert uris == [f"http://127.0.0.1:{cfg.port}"] * 2
        assert (home / "mlflow-server.log").read_text().count("starting on port") == 1
        status = server_status(home, cfg.port)
        assert status.healthy and status.pid is not None
        assert os.getpgid(status.pid) == status.pid  # its own session: survives its parent
        with pytest.raises(ServerError, match="runs on port"):  # never a second server
            ensure_server(TrackerConfig(home=str(home), port=free_port()))
    finally:
        assert stop_server(home)
    assert server_status(home, cfg.port).pid is None and not server_status(home, cfg.port).healthy


@pytest.mark.integration
def test_ensure_server_reuses_running_server(mlflow_server: MlflowServer) -> None:
    before = server_status(mlflow_server.home, mlflow_server.port)
    assert before.healthy and before.pid is not None
    t0 = time.monotonic()
    assert ensure_server(mlflow_server.cfg()) == mlflow_server.uri
    assert time.monotonic() - t0 < 2
    assert server_status(mlflow_server.home, mlflow_server.port).pid == before.pid
    # also from another home: whatever answers on the port is reused, nothing is started
    other = mlflow_server.cfg(home=str(mlflow_server.home / "elsewhere"))
    assert ensure_server(other) == mlflow_server.uri
    assert not (mlflow_server.home / "elsewhere" / "mlflow-server.pid").exists()
    print(f"server start took {mlflow_server.start_s:.1f} s")
