"""A real local MLflow server for the session, started with windtunnel's own ``ensure_server``;
and a switchable TCP proxy in front of it, to take the server "away" mid-run and bring it back
without paying for a server restart.

Use from a test module with ``pytest_plugins = ["fixtures_mlflow"]``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import skip_or_fail

from windtunnel.config import TrackerConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    uri: str
    home: Path
    port: int
    start_s: float
    """Seconds ``ensure_server`` took to bring it up."""

    def cfg(self, **overrides: object) -> TrackerConfig:
        kw: dict = {"home": str(self.home), "port": self.port, "experiment": "wt-tests"}
        return TrackerConfig(**{**kw, **overrides})


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server (SQLite store in a tmp dir, free port) for the whole session."""
    from windtunnel.tracking import ServerError, ensure_server, stop_server

    home = tmp_path_factory.mktemp("mlflow-home")
    port = free_port()
    cfg = TrackerConfig(home=str(home), port=port)
    t0 = time.monotonic()
    try:
        uri = ensure_server(cfg)
    except (ServerError, OSError) as e:
        stop_server(home)
        skip_or_fail(f"the MLflow server could not start here: {e}")
    server = MlflowServer(uri=uri, home=home, port=port, start_s=time.monotonic() - t0)
    try:
        yield server
    finally:
        stop_server(home)


class TcpProxy:
    """``127.0.0.1:<port>`` → target; :meth:`down` refuses and cuts every connection (as a
    dead server would), :meth:`up` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        for s in [listener, *conns]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._conns -= {a, b}


@pytest.fixture
def mlflow_proxy(mlflow_server: MlflowServer) -> Iterator[TcpProxy]:
    proxy = TcpProxy(mlflow_server.port)
    try:
        yield proxy
    finally:
        proxy.down()
