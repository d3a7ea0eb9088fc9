"""Launchers: run trial calls inline, as local processes, on SLURM (submitit) or on Ray.

    from windtunnel.launch import make_launcher
    with make_launcher({"name": "slurm", "partition": "gpu", "timeout_min": 30}) as launcher:
        jobs = launcher.map_array(train_trial, [(cfg, ckpt_dir) for cfg, ckpt_dir in trials])
        values = [job.result(timeout=3600) for job in jobs]

This module holds the registry (backend name -> implementation, imported on first use, so that
``import windtunnel.launch`` stays light). See `options` for each backend's typed options and
`launcher_options`, `base` for the interface and errors, `checkpoint` for preemption and
requeue, `slurm` for the pure SLURM parameter builder.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from windtunnel.launch.base import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED_STATES,
    PENDING,
    RUNNING,
    JobHandle,
    Launcher,
    wait_all,
)
from windtunnel.launch.options import (
    OPTIONS,
    InlineOptions,
    LauncherOptions,
    LocalOptions,
    RayOptions,
    SlurmOptions,
    launcher_options,
)
from windtunnel.launch.outcome import JobCancelled, JobFailed, LaunchError, TrialError

_IMPLEMENTATIONS: dict[str, str] = {
    "inline": "windtunnel.launch.inline:InlineLauncher",
    "local": "windtunnel.launch.local:LocalLauncher",
    "slurm": "windtunnel.launch.slurm:SlurmLauncher",
    "ray": "windtunnel.launch.ray_launcher:RayLauncher",
}
"""Backend name -> ``module:class`` of its launcher (each takes ``OPTIONS[name]``)."""

LAUNCHERS = tuple(_IMPLEMENTATIONS)


def launcher_class(name: str) -> type[Launcher]:
    """The launcher class of backend ``name`` (its module is imported now)."""
    target = _IMPLEMENTATIONS.get(name)
    if target is None:
        raise ValueError(f"unknown launcher {name!r}; valid launchers: {', '.join(LAUNCHERS)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def make_launcher(
    options: LauncherOptions | Mapping[str, Any] | None = None, /, **overrides: Any
) -> Launcher:
    """A launcher from typed options, or a mapping of them (``{"name": "slurm", ...}``, an
    OmegaConf node), plus ``overrides``; see :func:`launcher_options` for what is refused."""
    opts = launcher_options(options, **overrides)
    return launcher_class(opts.name)(opts)


__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "FINISHED_STATES",
    "LAUNCHERS",
    "OPTIONS",
    "PENDING",
    "RUNNING",
    "InlineOptions",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "LaunchError",
    "Launcher",
    "LauncherOptions",
    "LocalOptions",
    "RayOptions",
    "SlurmOptions",
    "TrialError",
    "launcher_class",
    "launcher_options",
    "make_launcher",
    "wait_all",
]
