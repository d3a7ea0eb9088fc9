"""One call as one job, waited for: how ``windtunnel train ... launcher=slurm`` runs a whole run
(``launcher.nodes=16 launcher.gpus_per_node=8``: one job of 128 tasks, the run's ranks).

:func:`run_job` submits, says where the job is (its id and log file) and waits for it. Leaving the
wait (Ctrl-C) leaves the job running: a long run does not die with the terminal that started it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from windtunnel.launch.options import LauncherOptions
from windtunnel.launch.outcome import JobFailed


@dataclass
class JobEnd:
    """How a job ended: its value, or why it has none."""

    job_id: str
    value: Any = None
    failure: JobFailed | None = None
    preempted: bool = False
    """Stopped by preemption or its time limit and not requeued: rerunning resumes it."""


def run_job(
    options: LauncherOptions,
    fn: Callable[..., Any],
    *args: Any,
    say: Callable[[str], None] = print,
    timeout: float | None = None,
) -> JobEnd:
    """``fn(*args)`` as one job of the launcher of ``options``, waited for."""
    from windtunnel.launch import make_launcher

    with make_launcher(options) as launcher:
        job = launcher.submit(fn, *args)
        where = ""
        paths = getattr(job, "paths", None)
        if paths is not None:
            where = f"; log: {paths.stderr} (stdout: {paths.stdout})"
        ranks = getattr(options, "world_size", 1)
        layout = (
            f"{ranks} ranks on {getattr(options, 'nodes', 1)} node(s)" if ranks > 1 else "1 rank"
        )
        say(f"submitted job {job.job_id} to launcher={options.name} ({layout}){where}")
        try:
            value = job.result(timeout=timeout)
        except JobFailed as e:
            native = job.native_state.split()[0].upper() if job.native_state else ""
            text = f"{e.reason} {getattr(e, 'message', '')}"
            preempted = native == "PREEMPTED" or "not requeued" in text
            return JobEnd(job.job_id, failure=e, preempted=preempted)
        except KeyboardInterrupt:
            say(
                f"stopped waiting; job {job.job_id} keeps running (cancel it with the "
                "scheduler, e.g. scancel); rerunning the same command resumes the run"
            )
            raise
    return JobEnd(job.job_id, value=value)
