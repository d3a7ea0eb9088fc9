"""Launchers: run trial calls inline, as local processes, on SLURM (submitit) or on Ray.

    from windtunnel.launch import LauncherConfig, make_launcher
    with make_launcher(LauncherConfig(name="slurm", partition="gpu", timeout_min=30)) as launcher:
        jobs = launcher.map_array(train_trial, [(cfg, ckpt_dir) for cfg, ckpt_dir in trials])
        values = [job.result(timeout=3600) for job in jobs]

See `base` for the interface and errors, `checkpoint` for preemption and requeue, `slurm` for the
pure SLURM parameter builder.
"""

from windtunnel.launch.base import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED_STATES,
    LAUNCHERS,
    PENDING,
    RUNNING,
    JobCancelled,
    JobFailed,
    JobHandle,
    Launcher,
    LauncherConfig,
    LaunchError,
    TrialError,
    make_launcher,
    wait_all,
)

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "FINISHED_STATES",
    "LAUNCHERS",
    "PENDING",
    "RUNNING",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "LaunchError",
    "Launcher",
    "LauncherConfig",
    "TrialError",
    "make_launcher",
    "wait_all",
]
