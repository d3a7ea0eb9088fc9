"""The SLURM launcher, through submitit's `SlurmExecutor`.

:func:`slurm_parameters` is the pure builder: launcher options -> the parameters given to
``SlurmExecutor.update_parameters`` (sbatch-level names: ``time`` in minutes, ``mem`` as "4GB",
``additional_parameters`` for extra ``#SBATCH`` lines). :func:`sbatch_script` renders the script
submitit writes for them. Both are checked against ``tests/golden/slurm_params.json``.

Every launcher instance has a fresh submitit folder ``<folder>/<job_name>-<time>-<rand>``;
several calls submitted together (``map_array``) form one job array, at most
``array_parallelism`` running at once. Calls are wrapped in :class:`Requeueable` unless
``checkpointable=False``: on preemption or near the time limit (SIGUSR2) the job is requeued and
the same call runs again (it resumes from its own checkpoint).

Job states come from ``sacct`` (accounting must be on: without it a job killed before writing its
result could never be told from a running one). A job that ends without a result is reported as
failed with its SLURM state (CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...) and its log tail.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from windtunnel import compat
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
from windtunnel.launch.options import SlurmOptions, launcher_options
from windtunnel.launch.outcome import Outcome

PREEMPTED_FINAL_S = 120.0  # PREEMPTED this long without a requeue: preempted for good
RESULT_GRACE_S = 3.0  # a finished job's result file may show up a little after sacct says so
LOG_TAIL_LINES = 40
SRUN_ARGS = ("--kill-on-bad-exit=1",)
"""srun flags of a job of several tasks: one task's failure ends the step (and so the others)."""
MASTER_PORTS = (20000, 32768)
"""MASTER_PORT of a job of several tasks: ``20000 + job id mod 12768``, below Linux's ephemeral
ports (32768-60999, where a client socket could hold it): two jobs on one node collide only if
their ids differ by a multiple of 12768."""

# SLURM job states -> normalized states (the rest: FAILED)
_ACTIVE = {
    "PENDING": PENDING,
    "REQUEUED": PENDING,
    "REQUEUE_FED": PENDING,
    "REQUEUE_HOLD": PENDING,
    "CONFIGURING": PENDING,
    "SUSPENDED": PENDING,
    "RESV_DEL_HOLD": PENDING,
    "RUNNING": RUNNING,
    "COMPLETING": RUNNING,
    "PREEMPTED": RUNNING,  # being requeued
    "RESIZING": RUNNING,
    "STAGE_OUT": RUNNING,
    "SIGNALING": RUNNING,
    "UNKNOWN": PENDING,  # not in sacct yet
    "READY": PENDING,
}
_REASONS = {
    "TIMEOUT": "hit its time limit",
    "NODE_FAIL": "its node failed",
    "OUT_OF_MEMORY": "ran out of memory",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "missed its deadline",
    "FAILED": "exited with an error before writing a result",
    "CANCELLED": "was cancelled (scancel, an admin, or preemption without requeue)",
    "PREEMPTED": "was preempted and not requeued",
    "COMPLETED": "completed without writing a result",
}


# --- the pure parameter builder -------------------------------------------------------------------
def _options(options: SlurmOptions | Mapping[str, Any]) -> SlurmOptions:
    if isinstance(options, SlurmOptions):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"slurm options expected, got {type(options).__name__}")
    if options.get("name", "slurm") != "slurm":
        raise ValueError(f"not slurm launcher options (name={options['name']!r})")
    opts = launcher_options({**options, "name": "slurm"})
    assert isinstance(opts, SlurmOptions)
    return opts


def format_mem(mem_gb: float) -> str:
    """sbatch --mem for ``mem_gb`` gigabytes: whole GB as "4GB", else MB ("1536MB")."""
    if mem_gb <= 0:
        raise ValueError(f"mem_gb must be > 0, got {mem_gb}")
    return f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB"


def slurm_parameters(options: SlurmOptions | Mapping[str, Any]) -> dict[str, Any]:
    """Slurm options (typed, or a mapping of them) -> ``SlurmExecutor.update_parameters``
    keyword arguments (pure).

    Defaults: job name "windtunnel", 60 min, one task on one node, USR2 90 s before the limit;
    with ``trials_per_job = k > 1`` and no ``cpus_per_task``, k CPUs (one per trial process).
    A trial of several ranks (``nodes``, ``tasks_per_node``, by default one task per GPU) is one
    job of ``nodes * tasks_per_node`` tasks, whose step srun ends as soon as one task fails
    (``--kill-on-bad-exit``: no rank waits for a dead one until the time limit).
    """
    o = _options(options)
    k = o.trials_per_job
    time_min = int(o.timeout_min)
    if time_min <= 0:
        raise ValueError(f"timeout_min must be > 0, got {time_min}")
    signal_delay = int(o.signal_delay_s)
    if signal_delay >= time_min * 60:
        raise ValueError(
            f"signal_delay_s={signal_delay} must be shorter than the time limit ({time_min * 60} s)"
        )
    p: dict[str, Any] = {
        "job_name": str(o.job_name),
        "time": time_min,
        "nodes": int(o.nodes),
        "ntasks_per_node": o.ranks_per_node,
        "signal_delay_s": signal_delay,
    }
    if o.world_size > 1:
        p["srun_args"] = list(SRUN_ARGS)
    cpus = o.cpus_per_task or (k if k > 1 else None)
    if cpus:
        p["cpus_per_task"] = int(cpus)
    if o.gpus_per_node:
        p["gpus_per_node"] = int(o.gpus_per_node)
    if o.mem_gb:
        p["mem"] = format_mem(float(o.mem_gb))
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(o, key):
            p[key] = str(getattr(o, key))
    if o.array_parallelism:
        n = int(o.array_parallelism)
        if n < 1:
            raise ValueError(f"array_parallelism must be >= 1, got {n}")
        p["array_parallelism"] = n
    if o.setup:
        p["setup"] = [str(line) for line in o.setup]
    extra = dict(o.extra_sbatch or {})
    if extra:
        managed = {"job-name", "time", "nodes", "ntasks-per-node", "signal", "cpus-per-task",
                   "gpus-per-node", "mem", "partition", "account", "qos", "constraint", "array",
                   "output", "error"}  # fmt: skip
        clash = sorted(k for k in extra if k.replace("_", "-").lstrip("-") in managed)
        if clash:
            raise ValueError(
                f"extra_sbatch {clash} duplicate(s) launcher options or submitit-managed flags; "
                "use the launcher option instead"
            )
        p["additional_parameters"] = {k.lstrip("-"): extra[k] for k in sorted(extra)}
    return p


def sbatch_script(
    params: Mapping[str, Any], folder: str | Path, command: str, map_count: int | None = None
) -> str:
    """The sbatch script submitit writes for ``params`` (``map_count``: size of a job array)."""

    return compat.sbatch_script(dict(params), folder, command, map_count)


# --- the ranks of a job of several tasks ----------------------------------------------------------
def export_rank_env() -> dict[str, str]:
    """In one task of a SLURM job of several tasks: torchrun's variables (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from SLURM's, set in ``os.environ``
    and returned; ``{}`` (nothing set) in a job of one task.

    submitit's ``TorchDistributedEnvironment`` reads them (rank = SLURM_PROCID, master = the
    job's first node). Its MASTER_PORT is a random draw seeded by the job id (20000-60000), or an
    inherited MASTER_PORT, which sbatch copies from the submitting shell into every job alike:
    the port is set here from the job id instead (see :data:`MASTER_PORTS`). Variables inherited
    from the submitting shell are overwritten: the job's own layout wins. CUDA_VISIBLE_DEVICES
    is left as SLURM set it (every task of a node sees the node's GPUs; a rank takes GPU
    LOCAL_RANK).
    """
    ntasks = os.environ.get("SLURM_NTASKS", "1")
    if not ntasks.isdigit() or int(ntasks) <= 1:
        return {}
    from submitit.helpers import TorchDistributedEnvironment

    job_id = os.environ.get("SLURM_JOB_ID", "0")
    low, high = MASTER_PORTS
    os.environ["MASTER_PORT"] = str(low + int(job_id) % (high - low) if job_id.isdigit() else low)
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": str(env.master_addr),
        "MASTER_PORT": str(env.master_port),
    }


class RankedCall:
    """``fn`` as one rank of a trial spanning the tasks of a SLURM job: torchrun's variables are
    exported (:func:`export_rank_env`) in each task before ``fn`` runs, also after a requeue
    (the launcher wraps it in :class:`~windtunnel.launch.checkpoint.Requeueable`, which requeues
    this same call). Rank 0's return value is the job's result."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        export_rank_env()
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"RankedCall({getattr(self.fn, '__qualname__', self.fn)!r})"


# --- handles --------------------------------------------------------------------------------------
class _Poller:
    """One ``sacct`` call for all jobs at most every ``interval`` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = float("-inf")

    def refresh(self, interval: float) -> None:
        from submitit.slurm.slurm import SlurmJob

        with self._lock:
            if time.monotonic() - self._last < interval:
                return
            SlurmJob.watcher.update()
            self._last = time.monotonic()


_poller = _Poller()


def _parse_trace(trace: str) -> tuple[str, str]:
    """(exception class name, message) from the last line of a Python traceback text."""
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(" ") and ":" in line and not line.startswith("Traceback"):
            head, _, msg = line.partition(":")
            if head and " " not in head.strip():
                return head.strip().rsplit(".", 1)[-1], msg.strip()
    return "Exception", lines[-1] if lines else ""


class SlurmJobHandle(JobHandle):
    """One SLURM job. A job of several tasks (the ranks of one trial) has its result from task 0
    (rank 0); when task 0 has none because another task failed, that task's error is reported."""

    def __init__(self, job: Any, poll_interval_s: float) -> None:
        from submitit.slurm.slurm import SlurmJob

        self._job = job
        self._tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
        self.job_id = str(job.job_id)
        self._poll = poll_interval_s
        self._cancel_requested = False
        self._outcome: Outcome | None = None
        self._preempted_since: float | None = None
        SlurmJob.watcher.register_job(self.job_id)

    @property
    def submitit_job(self) -> Any:
        return self._job

    @property
    def paths(self) -> Any:
        """Task 0's paths (its result, its logs)."""
        return self._tasks[0].paths

    @property
    def native_state(self) -> str:
        from submitit.slurm.slurm import SlurmJob

        _poller.refresh(self._poll)
        return SlurmJob.watcher.get_state(self.job_id, mode="cache")

    @property
    def state(self) -> str:
        if self._outcome is not None or self.done():
            out = self._finish()
            if out.cancelled:
                return CANCELLED
            return COMPLETED if out.ok else FAILED
        return _ACTIVE.get(self.native_state.split()[0].upper(), RUNNING)

    def _has_result(self) -> bool:
        return self.paths.result_pickle.exists()

    def done(self) -> bool:
        if self._outcome is not None or self._has_result():
            return True
        native = self.native_state
        state = native.split()[0].upper() if native else "UNKNOWN"
        if state == "PREEMPTED":  # being requeued, or final where preemption cancels jobs
            if self._preempted_since is None:
                self._preempted_since = time.monotonic()
            return time.monotonic() - self._preempted_since > PREEMPTED_FINAL_S
        self._preempted_since = None
        return state not in _ACTIVE

    def _wait_outcome(self, timeout: float | None) -> Outcome:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job_id} still {self.state} after {timeout} s")
            time.sleep(0.1)
        return self._finish()

    def _finish(self) -> Outcome:
        if self._outcome is not None:
            return self._outcome
        paths = self.paths
        native = self.native_state or "UNKNOWN"
        word = native.split()[0].upper()
        # a job that ran to its end may have written its result a moment before sacct says so
        grace = (
            RESULT_GRACE_S if word in ("COMPLETED", "FAILED") and not self._cancel_requested else 0
        )
        deadline = time.monotonic() + grace
        while not paths.result_pickle.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        failed_rank = None if paths.result_pickle.exists() else self._failed_task()
        if paths.result_pickle.exists():
            status, value = self._tasks[0]._get_outcome_and_result()
            if status == "success":
                self._outcome = Outcome(True, value)
            else:
                exc_type, message = _parse_trace(str(value))
                self._outcome = Outcome(
                    False, exc_type=exc_type, message=message, traceback=str(value)
                )
        elif self._cancel_requested:
            self._outcome = Outcome.cancel()
        elif failed_rank is not None:  # another rank raised; srun then stopped the rest
            rank, trace = failed_rank
            exc_type, message = _parse_trace(trace)
            self._outcome = Outcome(
                False,
                exc_type=exc_type,
                message=f"{message} (rank {rank} of {len(self._tasks)}; srun stopped the others)",
                traceback=trace,
            )
        else:
            why = _REASONS.get(word, "ended without a result")
            self._outcome = Outcome.failed(f"slurm job {why} (state {native})", log=self.log_tail())
        return self._outcome

    def _failed_task(self) -> tuple[int, str] | None:
        """(rank, traceback) of the first task other than 0 whose call raised, if any."""
        for rank, task in enumerate(self._tasks[1:], start=1):
            if task.paths.result_pickle.exists():
                try:
                    status, value = task._get_outcome_and_result()
                except Exception:  # a torn or unreadable result: not evidence of anything
                    continue
                if status != "success":
                    return rank, str(value)
        return None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str | None:
        parts = []
        for p in (self.paths.stderr, self.paths.stdout):
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or None

    def cancel(self) -> None:
        if self.done():
            return
        self._cancel_requested = True
        self._job.cancel(check=False)


def _check_accounting() -> None:
    """Warn when ``sacct`` fails: without accounting a job killed before writing its result
    cannot be told from a running one (its handle would only ever time out)."""
    try:
        r = subprocess.run(
            ["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        problem = r.stderr.strip() if r.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem:
        warnings.warn(
            f"slurm launcher: sacct does not work ({problem.splitlines()[-1]}); job states "
            "cannot be read, so a job that dies without a result is only seen through timeouts",
            stacklevel=3,
        )


# --- the launcher ---------------------------------------------------------------------------------
class SlurmLauncher(Launcher):
    """Submits to SLURM through submitit; see the module docstring."""

    name = "slurm"
    Options = SlurmOptions
    options: SlurmOptions

    def __init__(self, options: SlurmOptions | None = None) -> None:
        super().__init__(options)
        options = self.options
        from submitit import SlurmExecutor

        self.parameters = slurm_parameters(options)
        root = Path(options.folder or Path.cwd() / ".windtunnel" / "submitit")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.folder = (
            root.absolute() / f"{self.parameters['job_name']}-{stamp}-{uuid.uuid4().hex[:6]}"
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.checkpointable = options.checkpointable
        self.poll_interval_s = float(options.poll_interval_s)
        python = options.python or shlex.quote(sys.executable)
        self.executor = SlurmExecutor(
            folder=self.folder,
            max_num_timeout=int(options.max_num_timeout),
            python=python,
        )
        self.executor.update_parameters(**self.parameters)
        self._lock = threading.Lock()
        _check_accounting()

    def _wrap(self, fn: Any) -> Any:
        """What the job runs: ``fn``, as one rank of several when the job has several tasks,
        requeued on preemption unless not checkpointable (or ``fn`` checkpoints itself)."""
        own_checkpoint = hasattr(fn, "checkpoint")
        if self.options.world_size > 1:
            fn = RankedCall(fn)
        if not self.checkpointable or own_checkpoint:
            return fn
        from windtunnel.launch.checkpoint import Requeueable

        return Requeueable(fn)

    def _submit_calls(self, calls: list[Call]) -> list[JobHandle]:
        with self._lock:  # submitit's executor (and its batch context) is not thread-safe
            if len(calls) == 1:
                fn, args, kwargs = calls[0]
                jobs = [self.executor.submit(self._wrap(fn), *args, **kwargs)]
            else:  # one job array
                with self.executor.batch():
                    jobs = [self.executor.submit(self._wrap(fn), *a, **kw) for fn, a, kw in calls]
        return [SlurmJobHandle(j, self.poll_interval_s) for j in jobs]

    def sbatch_script(self, map_count: int | None = None) -> str:
        """The sbatch script this launcher's jobs get (for inspection)."""
        return sbatch_script(
            self.parameters, self.folder, compat.submitit_command(self.executor), map_count
        )
