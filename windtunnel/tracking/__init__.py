"""Where runs are recorded: the :class:`Tracker` / :class:`Run` protocol and its three kinds.

- ``mlflow``: MLflow (a local server started on demand, or ``cfg.uri``) plus a local journal;
  server trouble never reaches the trainer: the run goes offline and keeps journaling, and
  :func:`replay_journal` delivers the rest later, exactly once.
- ``jsonl``: the journal ``run_dir/journal.jsonl`` only.
- ``null``: nothing (inputs are still checked).

A run started in a ``run_dir`` that holds an unfinished run's journal resumes that run (same
``run_id``, same MLflow run). Nothing here imports mlflow at import time.

Reading runs back (the points table of a ladder, loss curves) and recording fits is
:mod:`windtunnel.tracking.runs` (imports pandas; not imported here).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from windtunnel.tracking.journal import (
    STATUSES,
    JournalRun,
    check_metrics,
    check_name,
    check_tags,
    flatten_params,
    new_run_id,
)
from windtunnel.tracking.replay import ReplayResult, replay_journal
from windtunnel.tracking.server import (
    DEFAULT_URI,
    ServerError,
    ServerStatus,
    ensure_server,
    is_healthy,
    mlflow_ui_url,
    server_status,
    stop_server,
    tracking_uri,
)

if TYPE_CHECKING:
    from windtunnel.config import TrackerConfig

__all__ = [
    "DEFAULT_URI",
    "STATUSES",
    "JournalRun",
    "JsonlTracker",
    "NullRun",
    "NullTracker",
    "ReplayResult",
    "Run",
    "ServerError",
    "ServerStatus",
    "Tracker",
    "ensure_server",
    "flatten_params",
    "is_healthy",
    "mlflow_ui_url",
    "open_tracker",
    "replay_journal",
    "server_status",
    "stop_server",
    "tracking_uri",
]


@runtime_checkable
class Run(Protocol):
    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Record ``metrics`` at ``step`` (tokens seen; may exceed 2**31)."""

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Record ``obj`` (e.g. the resolved config) as ``artifact_file`` (.yaml or .json)."""

    def log_artifact(self, path: Path) -> None: ...

    def flush(self) -> None:
        """Journal to disk and send what is buffered (retrying an absent server)."""

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``; ``error`` is kept as the tag
        ``wt.failure`` and in the journal."""


@runtime_checkable
class Tracker(Protocol):
    tracking_uri: str

    def start_run(
        self,
        *,
        run_dir: Path,
        name: str,
        experiment: str | None = None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent: Run | str | None = None,
    ) -> Run:
        """Start a run, or resume the run journaled in ``run_dir`` unless that one finished
        ``FINISHED`` (a killed, preempted or failed run that is restarted continues its curve:
        same ``run_id``, same MLflow run; its original params stay). ``params`` may be nested
        (flattened to dotted keys); ``parent`` is a Run or an MLflow run id."""
        ...


class JsonlTracker:
    """Journal-only tracker: every run writes ``run_dir/journal.jsonl`` and nothing else."""

    tracking_uri = ""

    def __init__(self, *, experiment: str = "windtunnel", flush_every: int = 50) -> None:
        self.experiment = experiment
        self.flush_every = flush_every

    def start_run(
        self,
        *,
        run_dir: Path,
        name: str,
        experiment: str | None = None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent: Any = None,
    ) -> JournalRun:
        return JournalRun(
            run_dir=run_dir,
            name=name,
            experiment=experiment or self.experiment,
            params=params,
            tags=tags,
            parent=parent,
            flush_every=self.flush_every,
        )


class NullRun:
    """Records nothing (input is still checked, so the null tracker catches the same bugs)."""

    def __init__(self) -> None:
        self.run_id = new_run_id()
        self.resumed = False

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        check_metrics(metrics, step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        check_tags(tags)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        check_name("artifact file", artifact_file)

    def log_artifact(self, path: Path) -> None:
        if not Path(path).exists():
            raise ValueError(f"log_artifact: {path} does not exist")

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"finish status must be one of {STATUSES}, got {status!r}")


class NullTracker:
    tracking_uri = ""

    def start_run(
        self,
        *,
        run_dir: Path,
        name: str,
        experiment: str | None = None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent: Any = None,
    ) -> NullRun:
        return NullRun()


def open_tracker(cfg: TrackerConfig) -> Tracker:
    """The tracker ``cfg.kind`` names; for ``mlflow`` with no ``cfg.uri`` the local server is
    started (or reused) first."""
    if cfg.kind == "null":
        return NullTracker()
    if cfg.kind == "jsonl":
        return JsonlTracker(experiment=cfg.experiment, flush_every=cfg.flush_every)
    if cfg.kind == "mlflow":
        from windtunnel.tracking.mlflow_run import MlflowTracker

        return MlflowTracker(
            ensure_server(cfg), experiment=cfg.experiment, flush_every=cfg.flush_every
        )
    raise ValueError(f"tracker.kind must be 'mlflow', 'jsonl' or 'null', got {cfg.kind!r}")
