"""Delivery of journal events to MLflow, shared by live runs and :func:`replay_journal`.

A live run and a replay use the same code, so "back online" is a replay of the backlog, and
replaying twice sends nothing twice: the sidecar ``journal.synced`` records the delivered
offset. (Belt and braces: every point carries the timestamp it was journaled with, and MLflow's
SQL store drops an exact duplicate point.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from windtunnel.files import LockHeld, acquire
from windtunnel.tracking.api import kv, metric
from windtunnel.tracking.backend import (
    MAX_METRICS,
    MAX_PARAMS_TAGS,
    MAX_TAG_LEN,
    Backend,
    Offline,
    SyncState,
    is_transient,
    probe,
)
from windtunnel.tracking.journal import JOURNAL_NAME, LOCK_NAME, iter_events

log = logging.getLogger("windtunnel.tracking")

if TYPE_CHECKING:
    from windtunnel.tracking.mlflow_run import MlflowRun

LIVE: dict[tuple[str, str], MlflowRun] = {}
"""(tracking URI, local run id) → live run in this process (parents of in-process children)."""


def parent_mlflow_id(
    backend: Backend,
    start: Mapping[str, Any],
    depth: int = 0,
    result: ReplayResult | None = None,
) -> str | None:
    """MLflow id of the parent of a journaled ``start`` (replaying the parent's journal first
    when it has not reached this server yet); :class:`Offline` while it cannot."""
    parent = start.get("parent")
    if not parent:
        return None
    live = LIVE.get((backend.uri, parent))
    if live is not None:
        if live.mlflow_run_id is None:
            live.try_sync(force=True)
        if live.mlflow_run_id is None:
            raise Offline(f"parent run {parent} is not in MLflow yet")
        return live.mlflow_run_id
    journal = start.get("parent_journal")
    if not journal or not Path(journal).exists():
        return parent  # given as an MLflow run id
    mid = SyncState.load(Path(journal), backend.uri).runs.get(parent)
    if mid is None and depth < 8:
        _replay_one(Path(journal), backend, result or ReplayResult(), depth=depth + 1)
        mid = SyncState.load(Path(journal), backend.uri).runs.get(parent)
    if mid is None:
        raise Offline(f"parent run {parent} ({journal}) is not in MLflow yet")
    return mid


def deliver(
    backend: Backend,
    state: SyncState,
    events: Iterable[tuple[dict[str, Any], int]],
    *,
    result: ReplayResult | None = None,
    depth: int = 0,
) -> int:
    """Send ``events`` (journal order, each with its end offset) and advance ``state``.

    Returns the number of metric points sent. Raises :class:`Offline` on a transient failure
    (``state`` then holds what did arrive); a rejected event (4xx) is skipped with a warning.
    """
    sent = 0
    batch: list[Any] = []
    batch_ends: list[int | None] = []  # end offset of an event whose last point this is

    def call(what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:
            if is_transient(e):
                raise Offline(f"{what}: {e}") from e
            backend.warn_once(f"{state.path}:{what}", "MLflow rejected %s (skipped): %s", what, e)
            if result is not None:
                result.rejected += 1
            return False

    def send_metrics(final: bool) -> None:
        nonlocal sent, batch, batch_ends
        while batch and (final or len(batch) >= MAX_METRICS):
            chunk, ends = batch[:MAX_METRICS], batch_ends[:MAX_METRICS]
            if call("metrics", backend.client.log_batch, state.runs[state.current], metrics=chunk):
                sent += len(chunk)
            batch, batch_ends = batch[MAX_METRICS:], batch_ends[MAX_METRICS:]
            done = [e for e in ends if e is not None]
            if done:
                state.offset = done[-1]
                state.save()

    try:
        for event, end in events:
            kind = event["ev"]
            if kind == "metrics":
                if state.current not in state.runs:
                    state.offset = end  # a run that could not be created (rejected): skip
                    continue
                items = list(event["values"].items())
                for i, (key, value) in enumerate(items):
                    batch.append(metric(key, value, event["t"], event["step"]))
                    batch_ends.append(end if i == len(items) - 1 else None)
                send_metrics(final=False)
                continue
            send_metrics(final=True)
            if kind == "start":
                state.current = event["run_id"]
                if state.current not in state.runs:
                    mid = _find_or_create(backend, event, result, depth)
                    if mid is not None:
                        state.runs[state.current] = mid
            elif state.current in state.runs:
                mid = state.runs[state.current]
                if kind == "resume":
                    call("resume", backend.client.update_run, mid, status="RUNNING")
                if kind in ("resume", "tags") and event.get("tags"):
                    tags = kv((k, v[:MAX_TAG_LEN]) for k, v in event["tags"].items())
                    for i in range(0, len(tags), MAX_PARAMS_TAGS):
                        call(
                            "tags",
                            backend.client.log_batch,
                            mid,
                            tags=tags[i : i + MAX_PARAMS_TAGS],
                        )
                elif kind == "dict":
                    call("dict", backend.client.log_dict, mid, event["obj"], event["file"])
                elif kind == "artifact":
                    _log_artifact(backend, state, mid, Path(event["path"]), call)
                elif kind == "finish":
                    if event.get("error"):
                        err = str(event["error"])[-MAX_TAG_LEN:]
                        call("failure tag", backend.client.set_tag, mid, "wt.failure", err)
                    call("finish", backend.client.update_run, mid, event["status"], event["t"])
            state.offset = end
            if result is not None:
                result.events_sent += 1
        send_metrics(final=True)
    except Offline:
        raise
    except Exception as e:
        if not is_transient(e):
            raise
        raise Offline(str(e)) from e
    finally:
        state.save()
        if result is not None:
            result.points_sent += sent
    return sent


def _find_or_create(
    backend: Backend, start: dict[str, Any], result: ReplayResult | None, depth: int
) -> str | None:
    """The MLflow run of a journaled ``start`` (created if absent; ``None`` if rejected)."""
    try:
        mid = backend.find_run(start)
        if mid is None:
            mid = backend.create_run(start, parent_mlflow_id(backend, start, depth, result))
            if result is not None:
                result.runs_created += 1
        return mid
    except Offline:
        raise
    except Exception as e:
        if is_transient(e):
            raise Offline(str(e)) from e
        log.warning("MLflow rejected run %s (%s); its events are skipped", start["run_id"], e)
        if result is not None:
            result.rejected += 1
        return None


def _log_artifact(backend: Backend, state: SyncState, mid: str, path: Path, call: Any) -> None:
    if not path.exists():
        backend.warn_once(f"missing:{path}", "artifact %s no longer exists: not uploaded", path)
    elif path.is_dir():
        call("artifact", backend.client.log_artifacts, mid, str(path), path.name)
    else:
        call("artifact", backend.client.log_artifact, mid, str(path))


# ----------------------------------------------------------------------------------------------
# replay
# ----------------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    journals: int = 0
    """Journals looked at."""
    runs_created: int = 0
    points_sent: int = 0
    """Metric points sent (0 on a second replay)."""
    events_sent: int = 0
    """Other events (start, tags, dicts, artifacts, finish) delivered."""
    rejected: int = 0
    """Events the server refused (4xx); skipped with a warning."""
    skipped_live: list[str] = field(default_factory=list)
    """Journals skipped because a live process holds them (it delivers them itself)."""


def _replay_one(path: Path, backend: Backend, result: ReplayResult, depth: int = 0) -> None:
    try:
        held = acquire(path.with_name(LOCK_NAME), blocking=False)
    except LockHeld:  # its writer is alive and delivers it itself
        result.skipped_live.append(str(path))
        return
    try:
        state = SyncState.load(path, backend.uri)
        deliver(backend, state, iter_events(path, state.offset), result=result, depth=depth)
    finally:
        held.release()


def replay_journal(path: Path, tracking_uri: str) -> ReplayResult:
    """Send MLflow what it lacks from ``path`` (a journal, or a folder: every ``journal.jsonl``
    below it), idempotently. Raises :class:`Offline` (a ``ConnectionError``) when the server
    cannot be reached; what was delivered so far stays recorded, so run it again later."""
    path = Path(path).resolve()
    journals = sorted(path.rglob(JOURNAL_NAME)) if path.is_dir() else [path]
    if not journals or not all(j.exists() for j in journals):
        raise FileNotFoundError(f"no run journal at {path}")
    if not probe(tracking_uri):
        raise Offline(f"MLflow at {tracking_uri} does not answer")
    backend = Backend(tracking_uri)
    result = ReplayResult(journals=len(journals))
    # parents first: shallower run folders first (children are created under their trunk)
    for journal in sorted(journals, key=lambda j: (len(j.parts), str(j))):
        _replay_one(journal, backend, result)
    return result
