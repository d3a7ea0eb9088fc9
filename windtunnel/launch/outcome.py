"""What a job sends back (:class:`Outcome`) and the launch layer's errors: shared by the
launchers (``base``) and the packed worker (``pack``), which must not import each other."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


# --- errors -------------------------------------------------------------------------------------
class LaunchError(RuntimeError):
    """Base class of the launch layer's errors."""


class JobFailed(LaunchError):
    """A job (or one trial of a packed job) did not produce a result.

    ``reason`` is one short line fit for a study's trial record ("worker killed by SIGKILL",
    "slurm state TIMEOUT", "trial raised ValueError: ..."); ``traceback`` is the trial's traceback
    text when the trial raised, ``log`` the tail of the job's output when there is one.
    """

    def __init__(
        self,
        job_id: str,
        reason: str,
        *,
        traceback: str | None = None,
        log: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.reason = reason
        self.traceback = traceback
        self.log = log
        msg = f"job {job_id} failed: {reason}"
        if traceback:
            msg += f"\n--- trial traceback ---\n{traceback.rstrip()}"
        if log:
            msg += f"\n--- job log (tail) ---\n{log.rstrip()}"
        super().__init__(msg)

    def __reduce__(self):  # picklable across processes
        return (_rebuild_failure, (type(self), self.job_id, self.reason, self.traceback, self.log))


class TrialError(JobFailed):
    """The trial function raised: ``exc_type`` is the exception's class name."""

    def __init__(
        self,
        job_id: str,
        exc_type: str,
        message: str,
        traceback: str | None = None,
        log: str | None = None,
    ) -> None:
        self.exc_type = exc_type
        self.message = message
        super().__init__(
            job_id, f"trial raised {exc_type}: {message}".strip(), traceback=traceback, log=log
        )

    def __reduce__(self):
        return (TrialError, (self.job_id, self.exc_type, self.message, self.traceback, self.log))


class JobCancelled(JobFailed):
    """The job was cancelled through its handle (`JobHandle.cancel`)."""


def _rebuild_failure(cls, job_id, reason, tb, log):
    return cls(job_id, reason, traceback=tb, log=log)


# --- outcomes: what a worker sends back for one trial ---------------------------------------------
@dataclass
class Outcome:
    """Result of one trial call, picklable: either ``value`` or an error description."""

    ok: bool
    value: Any = None
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    reason: str | None = None  # set when the trial never finished (killed, preempted, ...)
    cancelled: bool = False  # cancelled through its handle
    log: str | None = None  # tail of the job's output, when known

    @classmethod
    def capture(cls, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]):
        try:
            return cls(True, fn(*args, **kwargs))
        except Exception as e:
            return cls.from_exception(e)

    @classmethod
    def from_exception(cls, e: BaseException) -> Outcome:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return cls(False, exc_type=type(e).__name__, message=str(e), traceback=tb)

    @classmethod
    def failed(cls, reason: str, log: str | None = None) -> Outcome:
        return cls(False, reason=reason, log=log)

    @classmethod
    def cancel(cls) -> Outcome:
        return cls(False, reason="cancelled", cancelled=True)

    def unwrap(self, job_id: str) -> Any:
        if self.ok:
            return self.value
        if self.cancelled:
            raise JobCancelled(job_id, self.reason or "cancelled")
        if self.reason is not None:
            raise JobFailed(job_id, self.reason, log=self.log)
        raise TrialError(job_id, self.exc_type or "Exception", self.message or "", self.traceback)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS
        return os.cpu_count() or 1
