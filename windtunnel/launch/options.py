"""Launcher options: one keyword-only dataclass per backend, built from a plain mapping.

What Hydra composes from ``conf/launcher/<name>.yaml`` plus ``launcher.*`` overrides is a plain
dict; :func:`launcher_options` turns it into the backend's typed options and refuses, with a
ValueError naming the valid ones, an option the chosen backend does not have::

    launcher_options({"name": "slurm", "partition": "gpu", "timeout_min": 120})
    # SlurmOptions(name='slurm', trials_per_job=1, partition='gpu', timeout_min=120, ...)
    launcher_options({"name": "local", "partition": "gpu"})
    # ValueError: launcher.partition is not an option of launcher=local (it is an option of
    # launcher=slurm); its options: folder, max_workers, oversubscribe, prewarm, trials_per_job

Values are checked and converted to the field's type (``"8"`` -> 8). This module imports no
launcher implementation (see :func:`windtunnel.launch.make_launcher` for those).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from windtunnel.config import FieldTypeError, from_dict


@dataclass(kw_only=True)
class LauncherOptions:
    """What every backend takes."""

    name: str = ""
    """The backend: ``inline``, ``local``, ``slurm`` or ``ray`` (fixed by each subclass)."""
    trials_per_job: int = 1
    """Trials packed into one job, each its own process (they share the job's cores and GPU)."""

    def __post_init__(self) -> None:
        expected = type(self).__dataclass_fields__["name"].default
        if expected and self.name != expected:
            raise ValueError(f"{type(self).__name__} is for launcher={expected}, not {self.name!r}")
        if not isinstance(self.trials_per_job, int) or self.trials_per_job < 1:
            raise ValueError(f"launcher.trials_per_job must be >= 1, got {self.trials_per_job!r}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options of this backend (``name`` excluded), sorted."""
        return tuple(sorted(f.name for f in dataclasses.fields(cls) if f.name != "name"))

    def as_dict(self, *, changed_only: bool = False) -> dict[str, Any]:
        """The options as a plain dict with ``name``; ``changed_only``: only those whose value
        differs from the backend's default."""
        out = dataclasses.asdict(self)
        if changed_only:
            defaults = dataclasses.asdict(type(self)())
            out = {k: v for k, v in out.items() if k == "name" or v != defaults[k]}
        return out


@dataclass(kw_only=True)
class InlineOptions(LauncherOptions):
    """Trials run one after another inside the calling process (tests, debugging)."""

    name: str = "inline"


@dataclass(kw_only=True)
class LocalOptions(LauncherOptions):
    """Trials run as parallel processes on this machine."""

    name: str = "local"
    max_workers: int | None = None
    """Trial processes running at once (default: the usable cores)."""
    oversubscribe: bool = False
    """Allow ``max_workers`` above the usable cores (otherwise capped, with a warning)."""
    prewarm: bool = True
    """Fork workers from a process that has already imported torch (saves ~3 s per trial)."""
    folder: str | None = None
    """Root of the per-launcher job folders (default: a temporary folder, removed at close)."""


@dataclass(kw_only=True)
class SlurmOptions(LauncherOptions):
    """Trials run as SLURM jobs through submitit (several submitted together: one job array)."""

    name: str = "slurm"
    folder: str | None = None
    """Root of the submitit folders (default: ``.windtunnel/submitit`` in the working folder)."""
    job_name: str = "windtunnel"
    """``--job-name``."""
    partition: str | None = None
    """``--partition``."""
    nodes: int = 1
    """``--nodes``: the nodes of one trial (its ranks span them all)."""
    gpus_per_node: int | None = None
    """``--gpus-per-node``; also the default of ``tasks_per_node`` (one rank per GPU)."""
    tasks_per_node: int | None = None
    """``--ntasks-per-node``: the ranks of one trial on each node; a trial then runs on
    ``nodes * tasks_per_node`` ranks (default: ``gpus_per_node``, or 1 without GPUs or when
    packing trials with ``trials_per_job > 1``)."""
    cpus_per_task: int | None = None
    """``--cpus-per-task``: cores of each task, i.e. of each rank when a trial spans several
    (a node then gives ``tasks_per_node * cpus_per_task``); default ``trials_per_job`` when above
    1, else SLURM's default."""
    mem_gb: float | None = None
    """``--mem`` in GB (fractions become MB)."""
    timeout_min: int = 60
    """``--time``, in minutes."""
    array_parallelism: int | None = None
    """Jobs of one array running at once (``--array=...%N``)."""
    account: str | None = None
    """``--account``."""
    qos: str | None = None
    """``--qos``."""
    constraint: str | None = None
    """``--constraint``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (``module load ...``, ``source .venv/bin/activate``)."""
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    """Other ``#SBATCH`` flags (``{"exclusive": True}``); not ones the options above manage."""
    signal_delay_s: int = 90
    """SIGUSR2 this many seconds before the time limit (the job checkpoints and is requeued)."""
    max_num_timeout: int = 3
    """Requeues after hitting the time limit."""
    checkpointable: bool = True
    """Requeue a preempted or timed-out call (it resumes from its checkpoint)."""
    python: str | None = None
    """Python command on the nodes (default: this interpreter)."""
    poll_interval_s: float = 2.0
    """Seconds between ``sacct`` polls of the job states."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("nodes", "tasks_per_node"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"launcher.{key} must be >= 1, got {value!r}")
        if self.trials_per_job > 1 and self.world_size > 1:
            raise ValueError(
                f"launcher.trials_per_job={self.trials_per_job} packs one-process trials into a "
                f"job, but each trial here spans {self.world_size} ranks (launcher.nodes="
                f"{self.nodes}, launcher.tasks_per_node={self.ranks_per_node}): pack tiny proxies "
                "or spread big ones over ranks, not both"
            )

    @property
    def ranks_per_node(self) -> int:
        """Tasks (ranks) of one trial on each node: ``tasks_per_node``, else one per GPU."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return (self.gpus_per_node or 1) if self.trials_per_job == 1 else 1

    @property
    def world_size(self) -> int:
        """Ranks of one trial: ``nodes * ranks_per_node``."""
        return self.nodes * self.ranks_per_node


@dataclass(kw_only=True)
class RayOptions(LauncherOptions):
    """Trials run as Ray tasks, on a private local Ray or an existing cluster."""

    name: str = "ray"
    address: str | None = None
    """None or ``local``: start a private local Ray; else a cluster's address (``ray://head:10001``)."""
    max_workers: int | None = None
    """CPUs of a local Ray started here (default: all); ignored when joining a cluster."""
    cpus_per_task: float | None = None
    """CPUs reserved per task (default: ``trials_per_job``)."""
    gpus_per_task: float | None = None
    """GPUs reserved per task (fractions share a GPU)."""


OPTIONS: dict[str, type[LauncherOptions]] = {
    "inline": InlineOptions,
    "local": LocalOptions,
    "slurm": SlurmOptions,
    "ray": RayOptions,
}
"""Backend name -> its options class."""


def launcher_options(
    data: LauncherOptions | Mapping[str, Any] | None = None, /, **overrides: Any
) -> LauncherOptions:
    """The typed options of the backend ``data["name"]`` (default ``local``), with ``overrides``.

    ``data`` is a plain mapping (what Hydra composes for ``launcher``) or options already typed. Raises ValueError for an unknown backend, an option the backend does
    not have (naming the valid ones), or a value of the wrong type.
    """
    if isinstance(data, LauncherOptions):
        data = data.as_dict()
    items = {**(data or {}), **overrides}
    name = items.pop("name", None) or "local"
    cls = OPTIONS.get(str(name))
    if cls is None:
        raise ValueError(f"unknown launcher {name!r}; valid launchers: {', '.join(OPTIONS)}")
    valid = cls.option_names()
    unknown = sorted(k for k in items if k not in valid)
    if unknown:
        raise ValueError(_refusal(name, unknown, valid))
    return _typed(cls, items)


def with_ranks(options: LauncherOptions, nproc_per_node: int) -> LauncherOptions:
    """The launcher options for trials of ``train.nproc_per_node`` ranks per node; a one-line
    ValueError where the launcher cannot start them.

    On SLURM the ranks are the job's tasks: ``nproc_per_node > 1`` sets ``tasks_per_node`` when
    it is not given, and must agree with it (or with ``gpus_per_node``) when it is. Ray and the
    sweep launchers of this machine (local, inline) start the trial's ranks themselves (torch's
    elastic launcher), one trial per job; Ray runs a trial as one process.
    """
    if nproc_per_node <= 1:
        return options
    if isinstance(options, (LocalOptions, InlineOptions)):
        if options.trials_per_job > 1:
            raise ValueError(
                f"train.nproc_per_node={nproc_per_node} with launcher.trials_per_job="
                f"{options.trials_per_job}: a trial that spans ranks takes its job alone; "
                "set launcher.trials_per_job=1 for it (sweep.resources can do so by size)"
            )
        return options
    if isinstance(options, SlurmOptions):
        said = options.tasks_per_node
        if said is None and options.trials_per_job == 1:
            said = options.gpus_per_node
        if said is None:
            return dataclasses.replace(options, tasks_per_node=nproc_per_node)
        if said != nproc_per_node:
            which = "tasks_per_node" if options.tasks_per_node else "gpus_per_node"
            raise ValueError(
                f"train.nproc_per_node={nproc_per_node} but launcher.{which}={said}: on SLURM "
                "the ranks of a node are its tasks (one per GPU); set one of them, or both equal"
            )
        return options
    raise ValueError(
        f"train.nproc_per_node={nproc_per_node}: launcher={options.name} runs each trial as one "
        "process; run trials of several ranks with launcher=slurm (launcher.tasks_per_node, "
        "launcher.gpus_per_node, launcher.nodes) or launcher=local, or one run on this machine "
        f"with `windtunnel train ... train.nproc_per_node={nproc_per_node}`"
    )


def _refusal(name: str, unknown: list[str], valid: tuple[str, ...]) -> str:
    keys = ", ".join(f"launcher.{k}" for k in unknown)
    verb = "is not an option" if len(unknown) == 1 else "are not options"
    owners = sorted({n for k in unknown for n, c in OPTIONS.items() if k in c.option_names()})
    where = ""
    if owners:
        of = ", ".join(f"launcher={n}" for n in owners)
        where = f" (it is an option of {of})" if len(unknown) == 1 else f" (options of {of})"
    return f"{keys} {verb} of launcher={name}{where}; its options: {', '.join(valid)}"


def _typed(cls: type[LauncherOptions], items: dict[str, Any]) -> LauncherOptions:
    """``cls(**items)`` with each value checked and converted to its field's type."""
    try:
        return from_dict(cls, items)
    except FieldTypeError as e:
        raise ValueError(
            f"bad value of launcher.{e.key} for launcher={cls().name}: {e.value!r} is not "
            f"{'an' if e.expected == 'int' else 'a'} {e.expected}"
        ) from None
