"""The launcher interface: `Launcher.submit` / `map_array` returning `JobHandle`s.

Shaped like submitit's executor so that the sweep driver is the same on a laptop and on SLURM:

    launcher = make_launcher(LauncherConfig(name="local", max_workers=4))
    job = launcher.submit(fn, 1, 2)          # -> JobHandle
    jobs = launcher.map_array(fn, [(1, 2), (3, 4)])
    job.result(timeout=60)                    # value, or raises JobFailed / TrialError / TimeoutError

A trial that raised raises :class:`TrialError` (with the trial's traceback text); a job that died
(killed worker, ``scancel``, node failure, time limit) raises :class:`JobFailed` with a ``reason``;
a job cancelled through its handle raises :class:`JobCancelled`. Waiting never hangs on a dead job.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

Call = tuple[Callable[..., Any], tuple, dict]

# Normalized job states (launcher-specific detail lives in `JobHandle.native_state`).
PENDING = "PENDING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
FINISHED_STATES = frozenset({COMPLETED, FAILED, CANCELLED})


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


# --- configuration --------------------------------------------------------------------------------
@dataclass
class LauncherConfig:
    """Options of every launcher; each launcher accepts only its own (see `OPTIONS`).

    An option set to a non-default value that the chosen launcher does not take is refused with a
    ValueError listing the valid ones, so that ``launcher=local launcher.partition=gpu`` fails
    loudly instead of being ignored.
    """

    name: str = "local"  # inline | local | slurm | ray
    trials_per_job: int = 1  # trials packed into one job, each its own process
    # local / ray
    max_workers: int | None = None  # local: parallel trial processes (default: usable cores)
    oversubscribe: bool = False  # local: allow max_workers above the core count
    prewarm: bool = True  # local: fork workers from a process with torch imported
    folder: str | None = None  # local/slurm: root of the per-sweep job folders
    # slurm (submitit)
    job_name: str | None = None
    partition: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None  # slurm and ray
    mem_gb: float | None = None
    timeout_min: int | None = None
    array_parallelism: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before the job
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # {"exclusive": True, ...}
    signal_delay_s: int | None = None  # USR2 this long before the time limit (default 90)
    max_num_timeout: int | None = None  # requeues after a time-limit (default 3)
    checkpointable: bool | None = None  # requeue on USR2/time limit (default True)
    python: str | None = None  # python command on the nodes (default: this interpreter)
    poll_interval_s: float | None = None  # slurm: sacct polling period (default 2)
    # ray
    address: str | None = None  # None or "local": a local Ray; else a cluster address
    gpus_per_task: float | None = None

    def explicit(self) -> dict[str, Any]:
        """The options whose value differs from the default (``name`` excluded)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            value = getattr(self, f.name)
            if value != default:
                out[f.name] = value
        return out


def _config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(LauncherConfig) if f.name != "name"]


# --- launchers ------------------------------------------------------------------------------------
class Launcher(ABC):
    """Runs calls somewhere; subclasses declare the options they accept in ``OPTIONS``."""

    name: ClassVar[str]
    OPTIONS: ClassVar[tuple[str, ...]] = ("trials_per_job",)

    def __init__(self, **options: Any) -> None:
        check_options(self.name, self.OPTIONS, options)
        self.trials_per_job = int(options.get("trials_per_job", 1) or 1)
        if self.trials_per_job < 1:
            raise ValueError(f"trials_per_job must be >= 1, got {self.trials_per_job}")
        self.options = dict(options)

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


def check_options(name: str, valid: Iterable[str], options: Mapping[str, Any]) -> None:
    valid = sorted(set(valid))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"launcher {name!r} does not take option(s) {unknown}; valid options: {valid}"
        )


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS
        return os.cpu_count() or 1


LAUNCHERS = ("inline", "local", "slurm", "ray")


def launcher_class(name: str) -> type[Launcher]:
    if name == "inline":
        from windtunnel.launch.inline import InlineLauncher

        return InlineLauncher
    if name == "local":
        from windtunnel.launch.local import LocalLauncher

        return LocalLauncher
    if name == "slurm":
        from windtunnel.launch.slurm import SlurmLauncher

        return SlurmLauncher
    if name == "ray":
        from windtunnel.launch.ray_launcher import RayLauncher

        return RayLauncher
    raise ValueError(f"unknown launcher {name!r}; valid launchers: {list(LAUNCHERS)}")


def make_launcher(
    cfg: LauncherConfig | Mapping[str, Any] | None = None, /, **overrides: Any
) -> Launcher:
    """Build a launcher from a `LauncherConfig` (or a mapping of its fields) plus overrides.

    Options that differ from their defaults must be ones the launcher takes (ValueError listing
    the valid ones otherwise); keys that are no option at all are refused the same way.
    """
    if cfg is None:
        cfg = LauncherConfig()
    if isinstance(cfg, Mapping):
        data = dict(cfg)
        unknown = sorted(set(data) - {"name", *_config_fields()})
        if unknown:
            raise ValueError(
                f"unknown launcher option(s) {unknown}; valid options: {sorted(_config_fields())}"
            )
        cfg = LauncherConfig(**data)
    elif not isinstance(cfg, LauncherConfig):  # e.g. an OmegaConf DictConfig
        try:
            from omegaconf import OmegaConf

            return make_launcher(OmegaConf.to_container(cfg, resolve=True), **overrides)  # type: ignore[arg-type]
        except Exception as e:  # pragma: no cover
            raise TypeError(f"cannot read a launcher config from {type(cfg).__name__}") from e
    if overrides:
        unknown = sorted(set(overrides) - {"name", *_config_fields()})
        if unknown:
            raise ValueError(
                f"unknown launcher option(s) {unknown}; valid options: {sorted(_config_fields())}"
            )
        cfg = dataclasses.replace(cfg, **overrides)
    cls = launcher_class(cfg.name)
    return cls(**cfg.explicit())
