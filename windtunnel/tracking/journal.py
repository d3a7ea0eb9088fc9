"""The local append-only run journal, and the run that writes it (the ``jsonl`` tracker's run).

A run folder holds ``journal.jsonl``: one JSON object per line, written before anything is sent
anywhere, so that a run killed at any moment, or a run whose tracking server is away, loses
nothing that :func:`windtunnel.tracking.replay_journal` cannot deliver later.

Events (``ev``), each with ``t`` (wall time, ms since the epoch):

- ``start``   ``run_id, name, experiment, params, tags, parent, parent_journal`` — a new run;
  every later event belongs to the latest ``start`` (a journal can hold several runs in turn).
- ``resume``  ``tags`` — the same run continued by a later process.
- ``metrics`` ``step, values`` — one call of ``log_metrics``.
- ``tags``    ``tags``.
- ``dict``    ``file, obj`` — ``log_dict`` (the object itself is journaled).
- ``artifact`` ``path`` — ``log_artifact`` (absolute path; the file is uploaded from there).
- ``finish``  ``status, error``.

Every event is written and flushed to the OS when it is logged (a killed process loses none);
``fsync`` runs once per batch of ``flush_every`` points and at ``flush``/``finish``.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from windtunnel.files import LockHeld, acquire
from windtunnel.schema import FileModel, SchemaError, check_versioned, field_name, problem_text

log = logging.getLogger("windtunnel.tracking")

JOURNAL_NAME = "journal.jsonl"
JOURNAL_VERSION = 1
"""Version of the events' layout, in each ``start`` event (journals from before: version 1)."""
LOCK_NAME = "journal.lock"
STATUSES = ("FINISHED", "FAILED", "KILLED")
_NAME_RE = re.compile(r"^[/\w.\- :]*$")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_run_id() -> str:
    """A local run id shaped like MLflow's (32 hex digits)."""
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------------
# input checks shared by every tracker kind (bad input is a bug in the caller: ValueError)
# ----------------------------------------------------------------------------------------------


def check_name(kind: str, key: Any) -> str:
    if not isinstance(key, str) or not key or not _NAME_RE.match(key):
        raise ValueError(
            f"invalid {kind} name {key!r}: use letters, digits, '_', '-', '.', ' ', ':', '/'"
        )
    norm = posixpath.normpath(key)
    if norm != key or norm.startswith(("..", "/")) or len(key) > 250:
        raise ValueError(f"invalid {kind} name {key!r}: must be a clean relative path ≤ 250 chars")
    return key


def check_metrics(metrics: Mapping[str, float], step: int) -> dict[str, float]:
    """Validated copy of ``metrics`` as floats; ``step`` must be a non-negative int."""
    try:
        ok = not isinstance(step, bool) and operator.index(step) >= 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"step must be a non-negative integer (tokens seen), got {step!r}")
    out = {}
    for key, value in metrics.items():
        check_name("metric", key)
        if isinstance(value, bool):
            raise ValueError(f"metric {key!r}: expected a number, got a bool")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r}: expected a number, got {value!r}") from None
    return out


def check_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {check_name("tag", k): str(v) for k, v in tags.items()}


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict → ``{"model.d_model": "64", ...}``; lists as JSON; invalid key
    characters replaced by ``_`` (params come from configs and must never fail a run)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = re.sub(r"[^/\w.\- :]", "_", f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so the journal holds exactly what replay will read back."""
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------
# the events' schema
# ----------------------------------------------------------------------------------------------


class _Event(FileModel):
    t: int = 0


class StartEvent(_Event):
    ev: Literal["start"]
    version: int = 1
    run_id: str
    name: str | None = None
    experiment: str | None = None
    run_dir: str | None = None
    params: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    parent: str | None = None
    parent_journal: str | None = None


class ResumeEvent(_Event):
    ev: Literal["resume"]
    tags: dict[str, str] = Field(default_factory=dict)


class MetricsEvent(_Event):
    ev: Literal["metrics"]
    step: int
    values: dict[str, float]


class TagsEvent(_Event):
    ev: Literal["tags"]
    tags: dict[str, str]


class DictEvent(_Event):
    ev: Literal["dict"]
    file: str
    obj: Any


class ArtifactEvent(_Event):
    ev: Literal["artifact"]
    path: str


class FinishEvent(_Event):
    ev: Literal["finish"]
    status: str
    error: str | None = None


_EVENT = TypeAdapter(
    Annotated[
        StartEvent | ResumeEvent | MetricsEvent | TagsEvent | DictEvent | ArtifactEvent
        | FinishEvent,
        Field(discriminator="ev"),
    ]
)  # fmt: skip
_FIX = "the journal was written by another windtunnel: replay it with that one, or remove the run"


def check_event(event: Any, path: Path, start: int) -> None:
    """One journal line against the events' schema; :class:`SchemaError` names the journal, the
    line's byte offset and the field."""
    where = f"{path} (line at byte {start})"
    if isinstance(event, dict) and event.get("ev") == "start":
        check_versioned(event, {JOURNAL_VERSION: StartEvent}, path=where, what="journal", fix=_FIX)
        return
    try:
        _EVENT.validate_python(event)
    except ValidationError as e:
        err = e.errors()[0]
        tagged = err["type"] not in ("union_tag_invalid", "union_tag_not_found")
        field = field_name(err["loc"][1:]) if tagged else "ev"
        problem = f"{problem_text(err)} (this windtunnel reads journal version {JOURNAL_VERSION})"
        raise SchemaError(where, field, problem, _FIX) from None


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def iter_events(path: Path, offset: int = 0) -> Iterator[tuple[dict[str, Any], int]]:
    """``(event, end_offset)`` for every complete line from byte ``offset`` on; a torn or
    corrupt line (a process killed mid-write) is skipped with a warning, a complete event this
    windtunnel cannot read (another version, a mistyped field) is refused (:func:`check_event`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # torn last line of a live or killed writer: not complete yet
            pos += len(raw)
            if not raw.strip():
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                log.warning("journal %s: skipping a corrupt line ending at byte %d", path, pos)
                continue
            if isinstance(event, dict) and "ev" in event:
                check_event(event, path, pos - len(raw))
                yield event, pos


@dataclass
class JournalState:
    """What a journal says about its latest run."""

    start: dict[str, Any] | None = None
    """The latest ``start`` event (``None``: empty journal)."""
    finish: dict[str, Any] | None = None
    """The ``finish`` event after it, if any."""
    start_offset: int = 0
    """Byte offset where that ``start`` line begins."""
    logged: set[tuple[str, int]] = field(default_factory=set)
    """``(metric, step)`` pairs that run has journaled (a resumed run skips them again)."""


def read_state(path: Path) -> JournalState:
    state = JournalState()
    if not path.exists():
        return state
    prev_end = 0
    for event, end in iter_events(path):
        if event["ev"] == "start":
            state = JournalState(start=event, start_offset=prev_end)
        elif event["ev"] == "finish" and state.start is not None:
            state.finish = event
        elif event["ev"] == "resume":
            state.finish = None
        elif event["ev"] == "metrics":
            state.logged.update((k, event["step"]) for k in event["values"])
        prev_end = end
    return state


# ----------------------------------------------------------------------------------------------
# writing: a run that journals every event
# ----------------------------------------------------------------------------------------------


class JournalRun:
    """A run recorded only in ``run_dir/journal.jsonl`` (the ``jsonl`` tracker's run, and the
    base of the MLflow run). Hooks for subclasses: :meth:`_on_batch`, :meth:`_on_flush`,
    :meth:`_on_finish`."""

    def __init__(
        self,
        *,
        run_dir: Path,
        name: str,
        experiment: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent: Any = None,
        flush_every: int = 50,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.run_dir / JOURNAL_NAME
        self.flush_every = max(1, int(flush_every))
        self._unsynced_points = 0
        self._finished = self._warned_closed = False
        tags = check_tags(tags)
        self._lock = _try_lock(self.run_dir / LOCK_NAME)
        state = read_state(self.journal_path)
        self._f = open(self.journal_path, "ab")  # noqa: SIM115 (kept open for the run's life)
        if self._f.tell() and not _ends_with_newline(self.journal_path):
            self._f.write(b"\n")  # seal a torn line left by a killed writer
            self._f.flush()
        self.resumed = state.start is not None and (
            state.finish is None or state.finish.get("status") != "FINISHED"
        )
        # a resumed run replays from its last checkpoint: points already journaled are skipped
        # (a kill can land between journaling a point and the trainer recording that it did)
        self._journaled = state.logged if self.resumed else set()
        if self.resumed:
            assert state.start is not None
            self.run_id: str = state.start["run_id"]
            self.name = state.start.get("name", name)
            self.experiment = state.start.get("experiment", experiment)
            self.start_event = state.start
            self._write({"ev": "resume", "t": now_ms(), "tags": tags}, sync=True)
            log.info("resuming run %s from %s", self.run_id, self.journal_path)
        else:
            self.name, self.experiment = name, experiment
            parent_id, parent_journal = _parent_ref(parent)
            self.start_event = {
                "ev": "start",
                "t": now_ms(),
                "version": JOURNAL_VERSION,
                "run_id": "",
                "name": name,
                "experiment": experiment,
                "run_dir": str(self.run_dir),
                "params": flatten_params(params),
                "tags": tags,
                "parent": parent_id,
                "parent_journal": parent_journal,
            }
            self.run_id = self._create_remote(self.start_event) or new_run_id()
            self.start_event["run_id"] = self.run_id
            self._write(self.start_event, sync=True)

    # -- the Run protocol --------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        values = check_metrics(metrics, step)
        if self._journaled:
            values = {k: v for k, v in values.items() if (k, step) not in self._journaled}
        if self._closed("log_metrics") or not values:
            return
        self._write(
            {"ev": "metrics", "t": now_ms(), "step": operator.index(step), "values": values}
        )
        self._unsynced_points += len(values)
        if self._unsynced_points >= self.flush_every:
            self._sync_disk()
            self._on_batch()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        tags = check_tags(tags)
        if not self._closed("set_tags") and tags:
            self._write({"ev": "tags", "t": now_ms(), "tags": tags})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        check_name("artifact file", artifact_file)
        if not self._closed("log_dict"):
            self._write(
                {"ev": "dict", "t": now_ms(), "file": artifact_file, "obj": _json_safe(obj)}
            )

    def log_artifact(self, path: Path) -> None:
        path = Path(path).resolve()
        if not path.exists():
            raise ValueError(f"log_artifact: {path} does not exist")
        if not self._closed("log_artifact"):
            self._write({"ev": "artifact", "t": now_ms(), "path": str(path)})

    def flush(self) -> None:
        if self._finished:
            return
        self._sync_disk()
        self._on_flush()

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"finish status must be one of {STATUSES}, got {status!r}")
        if self._finished:
            return
        event = {"ev": "finish", "t": now_ms(), "status": status, "error": error}
        self._write(event, sync=True)
        try:
            self._on_finish()
        finally:
            self._finished = True
            self._f.close()
            if self._lock is not None:
                self._lock.release()

    # -- internals ---------------------------------------------------------------------------

    def _closed(self, what: str) -> bool:
        if self._finished and not self._warned_closed:
            self._warned_closed = True
            log.warning("run %s: %s after finish() is ignored", self.run_id, what)
        return self._finished

    def _write(self, event: dict[str, Any], *, sync: bool = False) -> None:
        line = json.dumps(event, separators=(",", ":"), default=str) + "\n"
        self._f.write(line.encode())
        self._f.flush()  # in the OS: survives a killed process
        self._after_write(event, self._f.tell())
        if sync:
            self._sync_disk()

    def _sync_disk(self) -> None:
        self._unsynced_points = 0
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())

    def _create_remote(self, start: dict[str, Any]) -> str | None:
        """Called before a new run's ``start`` is journaled; may return the run id to use."""
        return None

    def _after_write(self, event: dict[str, Any], end_offset: int) -> None:
        """Called after each event is journaled (the MLflow run queues it)."""

    def _on_batch(self) -> None:
        """Called every ``flush_every`` points, after the journal is on disk."""

    def _on_flush(self) -> None:
        """Called by :meth:`flush`, after the journal is on disk."""

    def _on_finish(self) -> None:
        """Called by :meth:`finish`, after the finish event is on disk."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r}, run_dir={str(self.run_dir)!r})"


def _try_lock(path: Path) -> Any:
    """Hold an exclusive lock on ``path`` for the run's life (released by `finish`, or by the
    kernel when the process dies): replay skips a journal whose writer is alive, and a second
    live writer of the same run folder is reported."""
    try:  # any thread may finish the run: the hold is the process's, not the thread's
        return acquire(path, blocking=False, thread_local=False)
    except LockHeld:
        log.warning("%s is held by another live process: two writers of one run?", path)
        return None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _parent_ref(parent: Any) -> tuple[str | None, str | None]:
    """``(parent run id, parent journal path)`` for a Run, a run-id string, or None."""
    if parent is None:
        return None, None
    if isinstance(parent, str):
        return parent, None
    journal = getattr(parent, "journal_path", None)
    return parent.run_id, (str(journal) if journal else None)


def metric_series(path: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one metric in a run's journal (the last value per step; [] when
    the run wrote no journal)."""
    if not path.is_file():
        return []
    seen = {
        int(ev["step"]): float(ev["values"][key])
        for ev, _ in iter_events(path)
        if ev["ev"] == "metrics" and key in ev.get("values", {})
    }
    return sorted(seen.items())
