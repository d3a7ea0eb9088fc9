"""The local launcher: each job is a worker process on this machine, at most N at a time.

N (``max_workers``) counts trial processes and defaults to the usable cores; more than that is
refused to a warning-and-cap unless ``oversubscribe=True``. With ``trials_per_job = k`` each job
runs k trial processes, so N // k jobs run at once. A worker that dies (SIGKILL, OOM killer,
``os._exit``) is reported as a failed job with the signal or exit code as its reason, never as a
hang; ``cancel()`` terminates the worker's whole process group (SIGTERM, then SIGKILL).

Workers are forked from a process that has already imported torch and the trainer
(``prewarm=True``, the default; see :mod:`windtunnel.launch.prewarm`), which saves each trial
about 3 s of start-up; ``prewarm=False`` (or a platform without ``fork``) starts a fresh Python.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from windtunnel.launch._worker import read_outcome, write_call
from windtunnel.launch.base import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    Call,
    JobHandle,
    Launcher,
)
from windtunnel.launch.options import LocalOptions
from windtunnel.launch.outcome import Outcome, usable_cores
from windtunnel.launch.pack import describe_exit
from windtunnel.procs import send_signal, terminate

KILL_GRACE_S = 3.0
LOG_TAIL_LINES = 40
_serial = itertools.count()


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:]) or None


class LocalJob(JobHandle):
    def __init__(self, launcher: LocalLauncher, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.folder = folder
        self._launcher = launcher
        self._state = PENDING
        self._outcome: Outcome | None = None
        self._proc: subprocess.Popen | None = None
        self._cancel_requested = False
        self._finished = threading.Event()

    @property
    def call_path(self) -> Path:
        return self.folder / "call.pkl"

    @property
    def result_path(self) -> Path:
        return self.folder / "result.pkl"

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    @property
    def pid(self) -> int | None:
        """The worker's pid while it runs."""
        return None if self._proc is None else self._proc.pid

    @property
    def state(self) -> str:
        return self._state

    def done(self) -> bool:
        return self._finished.is_set()

    def _wait_outcome(self, timeout: float | None) -> Outcome:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.job_id} still {self._state} after {timeout} s")
        assert self._outcome is not None
        return self._outcome

    def cancel(self) -> None:
        self._launcher._cancel(self)

    def log(self) -> str | None:
        """The worker's output so far (stdout and stderr together)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return None

    def _finish(self, outcome: Outcome) -> None:
        self._outcome = outcome
        if outcome.cancelled:
            self._state = CANCELLED
        else:
            self._state = COMPLETED if outcome.ok else FAILED
        self._finished.set()


class LocalLauncher(Launcher):
    """N parallel worker processes on this machine; see the module docstring."""

    name = "local"
    Options = LocalOptions
    options: LocalOptions

    def __init__(self, options: LocalOptions | None = None) -> None:
        super().__init__(options)
        options = self.options
        cores = usable_cores()
        n = int(options.max_workers or cores)
        if n < 1:
            raise ValueError(f"max_workers must be >= 1, got {n}")
        if n > cores and not options.oversubscribe:
            warnings.warn(
                f"local launcher: max_workers={n} capped to the {cores} usable cores "
                "(set oversubscribe=True to run more processes than cores)",
                stacklevel=2,
            )
            n = cores
        self.max_workers = n
        self.max_jobs = max(1, n // self.trials_per_job)
        root = options.folder
        self._own_root = root is None
        root_path = Path(root) if root else Path(tempfile.mkdtemp(prefix="wt-local-"))
        self.folder = root_path / f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prewarm = options.prewarm
        self._zygote: Any = None
        if self.prewarm:
            self._start_prewarm()
        self._lock = threading.Condition()
        self._queue: deque[LocalJob] = deque()
        self._running: set[LocalJob] = set()
        self._closed = False
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="wt-local-dispatch", daemon=True
        )
        self._dispatcher.start()
        self._finalizer = weakref.finalize(self, _kill_all, self._running, self._lock)

    # --- submission --------------------------------------------------------------------------
    def _submit_calls(self, calls: list[Call]) -> list[JobHandle]:
        jobs = []
        for fn, args, kwargs in calls:
            job_id = f"local-{next(_serial)}"
            job = LocalJob(self, job_id, self.folder / job_id)
            job.folder.mkdir(parents=True)
            write_call(job.call_path, fn, args, kwargs)
            jobs.append(job)
        with self._lock:
            if self._closed:
                raise RuntimeError("local launcher is closed")
            self._queue.extend(jobs)
            self._lock.notify_all()
        return jobs

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not (self._queue and len(self._running) < self.max_jobs):
                    self._lock.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self._running.add(job)
                try:
                    self._start(job)
                except Exception as e:  # could not even start a process
                    self._running.discard(job)
                    job._finish(Outcome.failed(f"could not start the worker: {e}"))
                    continue
            threading.Thread(
                target=self._watch, args=(job,), name=f"wt-{job.job_id}", daemon=True
            ).start()

    def _start_prewarm(self) -> None:
        """Start the zygote now: it imports torch while the sweep gets ready."""
        try:
            from windtunnel.launch.prewarm import Zygote

            self._zygote = Zygote()
        except Exception as e:  # no fork here, or the process could not start
            warnings.warn(f"local launcher: no prewarmed workers ({e})", stacklevel=3)
            self.prewarm = False

    def _start(self, job: LocalJob) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["WINDTUNNEL_JOB_ID"] = job.job_id
        if self.prewarm and self._zygote is not None:
            try:
                job._proc = self._zygote.fork(  # type: ignore[assignment]
                    str(job.call_path), str(job.result_path), str(job.log_path), env
                )
                job._state = RUNNING
                return
            except Exception as e:
                warnings.warn(
                    f"local launcher: prewarmed worker failed to start ({e}); "
                    "using fresh processes from now on",
                    stacklevel=2,
                )
                self.prewarm = False
        cmd = [
            sys.executable,
            "-m",
            "windtunnel.launch._worker",
            str(job.call_path),
            str(job.result_path),
        ]
        with open(job.log_path, "ab") as log:
            job._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        job._state = RUNNING

    def _watch(self, job: LocalJob) -> None:
        assert job._proc is not None
        rc = job._proc.wait()
        outcome = read_outcome(job.result_path)
        if job._cancel_requested and (outcome is None or not outcome.ok):
            outcome = Outcome.cancel()
        elif outcome is None:
            outcome = Outcome.failed(f"worker process {describe_exit(rc)}", log=tail(job.log_path))
        with self._lock:
            self._running.discard(job)
            job._finish(outcome)
            self._lock.notify_all()

    # --- cancel / close -------------------------------------------------------------------------
    def _cancel(self, job: LocalJob) -> None:
        with self._lock:
            if job.done():
                return
            job._cancel_requested = True
            if job in self._queue:
                self._queue.remove(job)
                job._finish(Outcome.cancel())
                return
            proc = job._proc
        if proc is not None:
            _terminate(proc)

    def close(self) -> None:
        """Cancel queued jobs and terminate running ones; the job folders stay."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            running = list(self._running)
            self._lock.notify_all()
        for job in pending:
            job._cancel_requested = True
            job._finish(Outcome.cancel())
        for job in running:
            job._cancel_requested = True
            if job._proc is not None:
                _terminate(job._proc)
        for job in running:
            job._finished.wait(KILL_GRACE_S + 2)
        if self._zygote is not None:
            self._zygote.close()
        if self._own_root:
            shutil.rmtree(self.folder.parent, ignore_errors=True)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL it after a grace period (in the background)."""
    threading.Thread(
        target=terminate, args=(proc,), kwargs={"group": True, "grace_s": KILL_GRACE_S}, daemon=True
    ).start()


def _kill_all(running: set[LocalJob], lock: threading.Condition) -> None:
    """At interpreter exit or garbage collection: leave no worker processes behind."""
    for job in list(running):
        if job._proc is not None and job._proc.poll() is None:
            send_signal(job._proc, signal.SIGKILL, group=True)
