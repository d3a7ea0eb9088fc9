"""The launcher interface: `Launcher.submit` / `map_array` returning `JobHandle`s.

Shaped like submitit's executor so that the sweep driver is the same on a laptop and on SLURM:

    launcher = make_launcher({"name": "local", "max_workers": 4})   # windtunnel.launch
    job = launcher.submit(fn, 1, 2)          # -> JobHandle
    jobs = launcher.map_array(fn, [(1, 2), (3, 4)])
    job.result(timeout=60)                    # value, or raises JobFailed / TrialError / TimeoutError

A trial that raised raises :class:`TrialError` (with the trial's traceback text); a job that died
(killed worker, ``scancel``, node failure, time limit) raises :class:`JobFailed` with a ``reason``;
a job cancelled through its handle raises :class:`JobCancelled`. Waiting never hangs on a dead job.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from windtunnel.launch.options import LauncherOptions
from windtunnel.launch.outcome import (
    JobFailed,
    Outcome,
)

Call = tuple[Callable[..., Any], tuple, dict]

# Normalized job states (launcher-specific detail lives in `JobHandle.native_state`).
PENDING = "PENDING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
FINISHED_STATES = frozenset({COMPLETED, FAILED, CANCELLED})


# --- handles --------------------------------------------------------------------------------------
class JobHandle(ABC):
    """One submitted call. ``job_id`` is the launcher's id (SLURM job id, local serial, Ray task)."""

    job_id: str

    @property
    @abstractmethod
    def state(self) -> str:
        """One of PENDING, RUNNING, COMPLETED, FAILED, CANCELLED."""

    @property
    def native_state(self) -> str:
        """The launcher's own state string (e.g. SLURM's "CANCELLED by 0"); defaults to `state`."""
        return self.state

    @abstractmethod
    def done(self) -> bool:
        """Whether the job has finished (successfully or not); never blocks for long."""

    @abstractmethod
    def _wait_outcome(self, timeout: float | None) -> Outcome:
        """Wait for the outcome (raise TimeoutError); failures are returned, not raised."""

    @abstractmethod
    def cancel(self) -> None:
        """Cancel the job if it has not finished (a no-op otherwise)."""

    def result(self, timeout: float | None = None) -> Any:
        """The trial's return value; raises JobFailed/TrialError/JobCancelled or TimeoutError."""
        return self._wait_outcome(timeout).unwrap(self.job_id)

    def exception(self, timeout: float | None = None) -> JobFailed | None:
        """The error `result()` would raise, or None on success."""
        try:
            self.result(timeout)
        except JobFailed as e:
            return e
        return None

    @property
    def reason(self) -> str | None:
        """Why a finished job failed (None while running or on success)."""
        if not self.done():
            return None
        e = self.exception(timeout=0)
        return None if e is None else e.reason

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.job_id} {self.state}>"


class PackedTrialHandle(JobHandle):
    """One trial of a job that runs several trials (``trials_per_job > 1``).

    Cancelling it cancels the whole job (all the trials packed with it).
    """

    def __init__(self, parent: JobHandle, index: int) -> None:
        self.parent = parent
        self.index = index
        self.job_id = f"{parent.job_id}.{index}"

    def done(self) -> bool:
        return self.parent.done()

    @property
    def state(self) -> str:
        st = self.parent.state
        if st != COMPLETED:
            return st
        return COMPLETED if self._wait_outcome(0).ok else FAILED

    @property
    def native_state(self) -> str:
        return self.parent.native_state

    def _wait_outcome(self, timeout: float | None) -> Outcome:
        outcome = self.parent._wait_outcome(timeout)
        if not outcome.ok:  # the job itself failed: every trial in it failed the same way
            return outcome
        return outcome.value[self.index]

    def cancel(self) -> None:
        self.parent.cancel()


def wait_all(handles: Iterable[JobHandle], timeout: float | None = None) -> None:
    """Wait until every handle is done; TimeoutError after ``timeout`` seconds in all."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for h in handles:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            h._wait_outcome(left)
        except TimeoutError:
            raise
        except Exception:
            pass


# --- launchers ------------------------------------------------------------------------------------
class Launcher(ABC):
    """Runs calls somewhere; built from its backend's typed options (``Options``)."""

    name: ClassVar[str]
    Options: ClassVar[type[LauncherOptions]] = LauncherOptions

    def __init__(self, options: LauncherOptions | None = None) -> None:
        if options is None:
            options = self.Options()
        if type(options) is not self.Options:
            raise TypeError(
                f"{type(self).__name__} takes {self.Options.__name__}, not {type(options).__name__}"
                " (build launchers with windtunnel.launch.make_launcher)"
            )
        self.options = options
        self.trials_per_job = options.trials_per_job

    @abstractmethod
    def _submit_calls(self, calls: list[Call]) -> list[JobHandle]:
        """Submit one job per ``(fn, args, kwargs)``; SLURM submits several as one job array."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> JobHandle:
        """Run ``fn(*args, **kwargs)`` as one job (always one trial per job)."""
        return self._submit_calls([(fn, args, kwargs)])[0]

    def map_array(self, fn: Callable[..., Any], list_of_args: Iterable[Any]) -> list[JobHandle]:
        """One trial per element, handles in the same order.

        An element that is a tuple is unpacked as positional arguments; anything else is passed
        as the single argument. With ``trials_per_job = k`` the trials are packed k per job
        (each trial its own process); the handles are then per trial.
        """
        calls: list[Call] = [(fn, a if isinstance(a, tuple) else (a,), {}) for a in list_of_args]
        if not calls:
            return []
        k = self.trials_per_job
        if k == 1:
            return self._submit_calls(calls)
        from windtunnel.launch.pack import PackRunner

        packs = [calls[i : i + k] for i in range(0, len(calls), k)]
        parents = self._submit_calls([(PackRunner(pack), (), {}) for pack in packs])
        return [
            PackedTrialHandle(p, i) for p, pack in zip(parents, packs) for i in range(len(pack))
        ]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the launcher holds (worker threads, a Ray it started)."""

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
