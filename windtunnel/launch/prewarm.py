"""Prewarmed worker processes for the local launcher: fork, don't re-import torch.

A fresh ``python -m windtunnel.launch._worker`` spends about 3 s of CPU before the trial starts
(importing torch 1.3 s, ``torch._dynamo`` 1.5 s — pulled in by the first ``torch.optim``
optimizer — plus optuna, hydra and the trainer; docs/benchmarks.md), 5–6% of a 60 s proxy trial.
Python's ``forkserver`` start method keeps one process that has imported :data:`PRELOAD` and
forks each worker from it, so a trial starts with all of that already in memory.

The forkserver imports modules but runs nothing: no torch thread pool exists before the fork.
Each forked worker starts its own session (``cancel`` kills its process group, as for a fresh
process), writes its output to the job's log and takes the launching process's environment.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import threading
from typing import Any

PRELOAD = (
    "torch",
    "torch._dynamo",
    "optuna",
    "omegaconf",
    "hydra",
    "cloudpickle",
    "windtunnel.cli",
    "windtunnel.train",
    "windtunnel.sweep.trial",
    "windtunnel.tracking.mlflow_run",
)
"""Imported once by the forkserver; a module that fails to import there is imported by the trial."""

_lock = threading.Lock()
_context: Any = None


def context() -> Any:
    """The forkserver context with :data:`PRELOAD` set, started in the background on first use."""
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(list(PRELOAD))
            from multiprocessing import forkserver

            forkserver.ensure_running()  # spawns it now; it imports PRELOAD while we go on
            _context = ctx
        return _context


def _child(call_path: str, result_path: str, log_path: str, env: dict[str, str]) -> None:
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.clear()
    os.environ.update(env)
    from windtunnel.launch._worker import main

    code = main([call_path, result_path])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class PrewarmedProcess:
    """A worker forked by the forkserver, with the part of ``subprocess.Popen`` the launcher uses."""

    def __init__(self, call_path: str, result_path: str, log_path: str, env: dict[str, str]):
        self._p = context().Process(
            target=_child, args=(call_path, result_path, log_path, env), daemon=True
        )
        self._p.start()
        self.pid: int = self._p.pid
        # the exit status is read once from a pipe: two threads must not both read it
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            return self._p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        from multiprocessing.connection import wait

        if not wait([self._p.sentinel], timeout):
            raise subprocess.TimeoutExpired("prewarmed worker", timeout or 0.0)
        with self._lock:
            self._p.join()
            return self._p.exitcode
