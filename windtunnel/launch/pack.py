"""Several trials in one job (``trials_per_job``): each trial its own process, sharing the job's
cores and GPU.

:class:`PackRunner` is the function a packed job runs. It starts one worker process per trial
(``python -m windtunnel.launch._worker``), waits for all of them and returns one `Outcome` per
trial, in order. Each trial process gets ``WINDTUNNEL_PACK_INDEX``/``WINDTUNNEL_PACK_SIZE`` and,
unless already set, ``OMP_NUM_THREADS`` = the job's cores divided among its trials.

It is checkpointable (submitit calls :meth:`PackRunner.checkpoint` on SIGUSR2): it terminates its
trial processes (they run their preemption callbacks), keeps the outcomes of the trials that had
already finished, and requeues itself; after the requeue only the unfinished trials run again,
each resuming from its own checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from windtunnel.launch._worker import read_outcome, write_call
from windtunnel.launch.outcome import Outcome, usable_cores
from windtunnel.procs import terminate_all

POLL_S = 0.05
TERM_GRACE_S = 10.0


def job_cores() -> int:
    """Cores this job may use: SLURM's allocation when inside a SLURM job, else the affinity."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return usable_cores()


def describe_exit(returncode: int) -> str:
    """A short reason for a process that ended without writing its outcome."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    if returncode == 143:
        return "terminated (SIGTERM)"
    return f"exited with code {returncode} without a result"


class PackRunner:
    """Run ``calls`` (a list of ``(fn, args, kwargs)``) as concurrent processes; see module doc."""

    def __init__(self, calls: list[tuple[Callable[..., Any], tuple, dict]]) -> None:
        self.calls = list(calls)
        self.outcomes: list[Outcome | None] = [None] * len(self.calls)
        self._procs: dict[int, subprocess.Popen] = {}
        self._dir: Path | None = None

    # pickling: running processes and the scratch dir stay behind
    def __getstate__(self) -> dict[str, Any]:
        return {"calls": self.calls, "outcomes": self.outcomes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]
        self.outcomes = state["outcomes"]
        self._procs = {}
        self._dir = None

    def __call__(self) -> list[Outcome]:
        todo = [i for i, o in enumerate(self.outcomes) if o is None]
        self._dir = Path(tempfile.mkdtemp(prefix="wt-pack-"))
        threads = max(1, job_cores() // max(1, len(self.calls)))
        try:
            for i in todo:
                self._start(i, threads)
            while self._procs:
                self._collect()
                time.sleep(POLL_S)
        finally:
            self._stop_all()
            shutil.rmtree(self._dir, ignore_errors=True)
        return [o if o is not None else Outcome.failed("trial did not run") for o in self.outcomes]

    def _start(self, i: int, threads: int) -> None:
        assert self._dir is not None
        fn, args, kwargs = self.calls[i]
        call = self._dir / f"{i}.call.pkl"
        write_call(call, fn, args, kwargs)
        env = dict(os.environ)
        env["WINDTUNNEL_PACK_INDEX"] = str(i)
        env["WINDTUNNEL_PACK_SIZE"] = str(len(self.calls))
        env["PYTHONUNBUFFERED"] = "1"
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(threads))
        cmd = [sys.executable, "-m", "windtunnel.launch._worker", str(call), str(self._result(i))]
        self._procs[i] = subprocess.Popen(cmd, env=env)

    def _result(self, i: int) -> Path:
        assert self._dir is not None
        return self._dir / f"{i}.result.pkl"

    def _collect(self) -> None:
        for i, p in list(self._procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            self._procs.pop(i, None)
            out = read_outcome(self._result(i))
            self.outcomes[i] = (
                out if out is not None else Outcome.failed(f"trial process {describe_exit(rc)}")
            )

    def _stop_all(self) -> None:
        terminate_all(self._procs.values(), grace_s=TERM_GRACE_S)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on SIGUSR2: stop the trial processes, keep the finished outcomes."""
        from submitit.helpers import DelayedSubmission

        from windtunnel.launch.checkpoint import run_preempt_callbacks

        run_preempt_callbacks()
        self._collect()  # trials that finished before the signal keep their outcome
        terminate_all(self._procs.values(), grace_s=TERM_GRACE_S)
        for i in list(self._procs):
            out = read_outcome(self._result(i))
            if out is not None:  # finished while being stopped
                self.outcomes[i] = out
            self._procs.pop(i, None)
        return DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        done = sum(o is not None for o in self.outcomes)
        return f"PackRunner({len(self.calls)} trials, {done} done)"
