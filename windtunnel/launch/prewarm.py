"""Prewarmed worker processes for the local launcher: fork, don't re-import torch.

A fresh ``python -m windtunnel.launch._worker`` spends about 3 s of CPU before the trial starts
(importing torch 1.3 s, ``torch._dynamo`` 1.5 s — pulled in by the first ``torch.optim``
optimizer — plus optuna, hydra and the trainer; docs/benchmarks.md), 5–6% of a 60 s proxy trial.

A *zygote* (``python -m windtunnel.launch.prewarm``) imports :data:`PRELOAD` once and then forks
one worker per job. It runs nothing but imports, so no torch thread pool exists at the fork. The
launcher talks to it over its stdin/stdout, one JSON object per line:

- to the zygote: ``{"call", "result", "log", "env", "cwd"}`` — fork a worker for this job;
- from it: ``{"pid"}`` (the worker started, or ``{"error"}``), then ``{"exit": pid, "rc"}``
  when a worker ends (``rc`` negative: killed by that signal, as with ``subprocess``).

Each worker starts its own session (``cancel`` kills its process group, as for a fresh process),
writes its output to the job's log and takes the launching process's environment and folder at
submit time. The zygote exits when its stdin closes (the launcher went away).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from typing import Any

from windtunnel.procs import send_signal

PRELOAD = (
    "torch",
    "torch._dynamo",
    "optuna",
    "cloudpickle",
    "windtunnel.train",
    "windtunnel.sweep.trial",
    "windtunnel.tracking.mlflow_run",
)
"""Imported once by the zygote; one that fails to import there is imported by the trial."""

REAP_S = 0.02


# --- the zygote process ---------------------------------------------------------------------------
def _send(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _fork_worker(req: dict[str, Any]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the worker: never returns into the zygote's loop
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        from windtunnel.launch._worker import main

        code = main([req["call"], req["result"]])
    except BaseException as e:  # report it in the job's log; the launcher sees the exit code
        with contextlib.suppress(Exception):
            print(f"prewarmed worker failed before the trial: {e!r}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    stdin = sys.stdin.buffer
    buf = b""
    children: set[int] = set()
    _send({"ready": True})
    while True:
        ready, _, _ = select.select([stdin], [], [], REAP_S)
        if ready:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                return  # the launcher is gone
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    pid = _fork_worker(json.loads(line))
                except Exception as e:
                    _send({"error": repr(e)})
                    continue
                children.add(pid)
                _send({"pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _send({"exit": pid, "rc": os.waitstatus_to_exitcode(status)})


# --- the launcher's side --------------------------------------------------------------------------
class Zygote:
    """The launcher's handle on one zygote process; thread-safe."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "windtunnel.launch.prewarm"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._lock = threading.Lock()  # one request/answer at a time
        self._answers: list[dict[str, Any]] = []
        self._answered = threading.Condition()
        self._exits: dict[int, int] = {}
        self._workers: dict[int, threading.Event] = {}
        self._dead = False
        threading.Thread(target=self._read, name="wt-zygote", daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            msg = json.loads(raw)
            with self._answered:
                if "exit" in msg:
                    self._exits[msg["exit"]] = msg["rc"]
                    ev = self._workers.pop(msg["exit"], None)
                    if ev is not None:
                        ev.set()
                elif "ready" not in msg:
                    self._answers.append(msg)
                self._answered.notify_all()
        with self._answered:  # the zygote died: its workers could no longer be waited for
            self._dead = True
            for pid, ev in self._workers.items():
                send_signal(pid, signal.SIGKILL, group=True)
                ev.set()
            self._answered.notify_all()

    def fork(self, call: str, result: str, log: str, env: dict[str, str]) -> PrewarmedProcess:
        req = {"call": call, "result": result, "log": log, "env": env, "cwd": os.getcwd()}
        with self._lock:
            if self._dead or self._proc.stdin is None:
                raise RuntimeError("the prewarmed-worker process is not running")
            self._proc.stdin.write((json.dumps(req) + "\n").encode())
            self._proc.stdin.flush()
            with self._answered:
                while not self._answers and not self._dead:
                    self._answered.wait()
                if self._dead:
                    raise RuntimeError("the prewarmed-worker process died")
                msg = self._answers.pop(0)
                if "error" in msg:
                    raise RuntimeError(f"could not fork a worker: {msg['error']}")
                pid = int(msg["pid"])
                ev = threading.Event()
                if pid in self._exits:
                    ev.set()
                else:
                    self._workers[pid] = ev
        return PrewarmedProcess(self, pid, ev)

    def exit_code(self, pid: int) -> int | None:
        with self._answered:
            return self._exits.get(pid)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        if self._proc.poll() is None:
            self._proc.kill()


class PrewarmedProcess:
    """A worker forked by the zygote, with the part of ``subprocess.Popen`` the launcher uses."""

    def __init__(self, zygote: Zygote, pid: int, exited: threading.Event) -> None:
        self.pid = pid
        self._zygote = zygote
        self._exited = exited

    def poll(self) -> int | None:
        if not self._exited.is_set():
            return None
        rc = self._zygote.exit_code(self.pid)
        return 255 if rc is None else rc  # the zygote died first (and killed the worker)

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired("prewarmed worker", timeout or 0.0)
        rc = self.poll()
        assert rc is not None
        return rc


if __name__ == "__main__":
    serve()
