"""The local MLflow server: start once, reuse, stop.

The default store is one ``mlflow server`` on loopback with a SQLite backend (the only writer of
the database); every training process logs to it over HTTP. It is started detached (its own
session: it outlives the process that started it) and reused by every later process that finds
it answering on ``/health``. A file lock keeps two processes from starting two servers at once.

No ``import mlflow`` here: the server runs in its own process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from windtunnel.files import lock
from windtunnel.procs import terminate

START_TIMEOUT_S = 90.0
LOG_NAME, PID_NAME, LOCK_NAME = "mlflow-server.log", "mlflow-server.pid", "mlflow-server.lock"
SERVER_ENV = {
    # Without these two settings (and --workers 1) the server starts ~15 processes and ~3 GB.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

DEFAULT_PORT = 5055
"""Port of the local server (``tracker.port``'s default)."""

_STARTED: dict[str, subprocess.Popen[bytes]] = {}
"""Servers started by this process (kept so that Python never warns about them)."""


class ServerError(RuntimeError):
    """The local MLflow server could not be started."""


def local_uri(port: int = DEFAULT_PORT) -> str:
    return f"http://127.0.0.1:{port}"


DEFAULT_URI = local_uri(DEFAULT_PORT)


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to read from or write to: ``uri``, else ``$MLFLOW_TRACKING_URI``, else
    the local server (``http://127.0.0.1:5055``)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def is_healthy(uri: str, timeout: float = 2.0, *, strict: bool = True) -> bool:
    """Whether the MLflow server at ``uri`` answers ``GET /health`` (the one health check).

    ``strict``: only a 200 counts (the local server answering, for :func:`ensure_server`);
    otherwise any answer below 500 does (a remote server or proxy without a ``/health`` path is
    still answering). A URI that is not HTTP (``sqlite:``, ``file:``, a folder) names a store
    with no server in between: always True.
    """
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return not strict or r.status == 200
    except urllib.error.HTTPError as e:
        return not strict and e.code < 500
    except (OSError, ValueError):
        return False


def ensure_server(cfg: Any, *, timeout_s: float = START_TIMEOUT_S) -> str:
    """Tracking URI for ``cfg`` (a :class:`~windtunnel.config.TrackerConfig`).

    ``cfg.uri`` if set; else the server answering on ``127.0.0.1:cfg.port``; else a new
    server started in ``cfg.home`` (SQLite store ``mlflow.db``, artifacts ``mlartifacts/``, log
    ``mlflow-server.log``, pid ``mlflow-server.pid``). Raises :class:`ServerError` pointing at
    the log when it does not come up within ``timeout_s``.
    """
    if cfg.uri:
        return str(cfg.uri)
    uri = local_uri(int(cfg.port))
    if is_healthy(uri):
        return uri
    home = Path(cfg.home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    with lock(home / LOCK_NAME):  # a second process waits here, then reuses
        if is_healthy(uri):
            return uri
        running = _running_port(home)
        if running is not None:  # never a second server (a second writer) on one store
            if running != int(cfg.port):
                raise ServerError(
                    f"the MLflow server of {home} runs on port {running}, not {cfg.port}: "
                    f"set tracker.port={running}, or stop it (stop_server({str(home)!r}))"
                )
            if _wait_healthy(uri, None, timeout_s):
                return uri
            raise ServerError(
                f"the MLflow server of {home} (pid {_read_pid(home)}) does not answer on "
                f"{uri}/health; see {home / LOG_NAME}, or stop it (stop_server)"
            )
        _start(home, int(cfg.port), timeout_s)
        return uri


def server_command(home: Path, port: int) -> list[str]:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    exe = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    return [
        *exe,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--default-artifact-root",
        str(home / "mlartifacts"),
        "--workers",
        "1",
        "--uvicorn-opts",
        "--no-access-log",  # one line per request would grow the log without bound
    ]


def _start(home: Path, port: int, timeout_s: float) -> None:
    log_path = home / LOG_NAME
    env = {**os.environ, **SERVER_ENV}
    with open(log_path, "ab") as log_f:
        log_f.write(
            f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting on port {port}\n".encode()
        )
        log_f.flush()
        proc = subprocess.Popen(
            server_command(home, port),
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives us, and its whole group can be stopped
        )
    _STARTED[str(home)] = proc
    (home / PID_NAME).write_text(f"{proc.pid}\n")
    uri = local_uri(port)
    if _wait_healthy(uri, proc, timeout_s):
        return
    if proc.poll() is not None:
        raise ServerError(
            f"the MLflow server exited with code {proc.returncode} before answering on "
            f"{uri} (port in use?); see {log_path}:\n{_tail(log_path)}"
        )
    raise ServerError(
        f"the MLflow server did not answer on {uri}/health within {timeout_s:.0f} s "
        f"(pid {proc.pid} left running); see {log_path}:\n{_tail(log_path)}"
    )


def _wait_healthy(uri: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_healthy(uri, timeout=1.0):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.25)
    return False


def _running_port(home: Path) -> int | None:
    """Port of the live server started from ``home`` (None: none runs)."""
    pid = _read_pid(home)
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        return int(args[args.index("--port") + 1])
    return None


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _read_pid(home: Path) -> int | None:
    try:
        pid = int((home / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    try:  # alive, and still an mlflow process (not a recycled pid)?
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, 0)
    except (OSError, ProcessLookupError):
        return None
    if b"mlflow" not in cmdline or str(home).encode() not in cmdline:
        return None  # not the server of this home
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return None  # a zombie: it is dead
    return pid


@dataclass
class ServerStatus:
    uri: str
    healthy: bool
    """Something answers on ``uri``/health."""
    pid: int | None
    """The live server started from ``home`` (None: none, or it died)."""
    home: Path
    log: Path


def server_status(home: str | Path, port: int) -> ServerStatus:
    home = Path(home).expanduser().resolve()
    uri = local_uri(port)
    return ServerStatus(uri, is_healthy(uri), _read_pid(home), home, home / LOG_NAME)


def stop_server(home: str | Path, *, timeout_s: float = 15.0) -> bool:
    """Stop the server started from ``home`` (SIGTERM to its process group, then SIGKILL).
    Returns whether one was running."""
    home = Path(home).expanduser().resolve()
    pid = _read_pid(home)
    (home / PID_NAME).unlink(missing_ok=True)
    if pid is None:
        return False
    proc = _STARTED.get(str(home))
    target = proc if proc is not None and proc.pid == pid else pid  # our child: reap it too
    # the server is its own session and group leader: stop the whole group
    if terminate(target, group=True, grace_s=timeout_s):
        _STARTED.pop(str(home), None)
    return True


def mlflow_ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow page with the loss charts (the experiment's default page has none)."""
    base = f"{uri.rstrip('/')}/#/experiments/{experiment_id}"
    if run_id:
        return f"{base}/runs/{run_id}/model-metrics"
    return f"{base}/runs?compareRunsMode=CHART"
