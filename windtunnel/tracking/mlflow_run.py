"""The live MLflow run: journal first, send in batches, never raise for server trouble.

Online, events are sent from memory every ``flush_every`` points, by a background thread (the
trainer does not wait for the server; ``flush``/``finish`` wait for everything). When the server is away the
run warns once, keeps journaling, and at later flushes (at most every ``RETRY_EVERY_S``; always
at ``flush``/``finish``) probes ``/health`` and, once it answers, replays the backlog from the
journal. A run that starts offline keeps a local run id; its MLflow run is created on delivery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from windtunnel.tracking.backend import Backend, Offline, SyncState, is_transient, probe
from windtunnel.tracking.journal import JournalRun, iter_events
from windtunnel.tracking.replay import LIVE, deliver, parent_mlflow_id

log = logging.getLogger("windtunnel.tracking")

RETRY_EVERY_S = 30.0
"""While offline, a batch flush tries the server again at most this often (flush/finish always)."""

# ----------------------------------------------------------------------------------------------
# the live run
# ----------------------------------------------------------------------------------------------


class MlflowRun(JournalRun):
    """A journaled run mirrored to MLflow; never raises into the trainer for server trouble."""

    def __init__(self, *, backend: Backend, background: bool = True, **kwargs: Any) -> None:
        self._backend = backend
        self._pending: list[tuple[dict[str, Any], int]] | None = None  # None: read the file
        self._pending_lock = threading.Lock()  # the trainer appends, the sender takes
        self._send_lock = threading.RLock()  # one delivery at a time
        self._wake = threading.Event()
        self._stopping = False
        self._sender: threading.Thread | None = None
        self._online = False
        self._last_try = -1e18
        self._state: SyncState | None = None
        self._warned_offline = False
        super().__init__(**kwargs)
        self._state = self._state or SyncState.load(self.journal_path, backend.uri)
        LIVE[(backend.uri, self.run_id)] = self
        self.try_sync()  # offline at start: it was just tried; resumed: deliver the backlog
        if background:
            self._sender = threading.Thread(
                target=self._send_loop, name=f"wt-mlflow-{self.run_id[:8]}", daemon=True
            )
            self._sender.start()

    @property
    def tracking_uri(self) -> str:
        return self._backend.uri

    @property
    def mlflow_run_id(self) -> str | None:
        """This run's id in MLflow (``None`` while it has not reached the server)."""
        return self._state.runs.get(self.run_id) if self._state else None

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment's id (looked up if this process has not yet; None offline)."""
        if self.experiment not in self._backend.experiments and self._online:
            try:
                self._backend.experiment_id(self.experiment)
            except Exception:
                return None
        return self._backend.experiments.get(self.experiment)

    def _create_remote(self, start: dict[str, Any]) -> str | None:
        """Online at start: create the MLflow run first so that ``run_id`` is MLflow's id."""
        if not probe(self._backend.uri):
            self._go_offline(Offline(f"{self._backend.uri} does not answer"))
            return None
        try:
            mid = self._backend.create_run(start, parent_mlflow_id(self._backend, start))
        except Exception as e:
            if not isinstance(e, Offline) and not is_transient(e):
                log.warning("MLflow rejected the run %s: %s (journaling only)", start["name"], e)
            self._go_offline(e)
            return None
        self._state = SyncState.load(self.journal_path, self._backend.uri)
        self._state.runs[mid] = mid
        self._online = True
        # in memory from here on, unless an earlier run in this journal is still undelivered
        self._pending = [] if self._state.offset >= self.journal_path.stat().st_size else None
        return mid

    def _after_write(self, event: dict[str, Any], end_offset: int) -> None:
        with self._pending_lock:
            if self._pending is not None:
                self._pending.append((event, end_offset))

    def _on_batch(self) -> None:
        if self._sender is not None:
            self._wake.set()
        else:
            self.try_sync()

    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            self.try_sync()

    def _on_flush(self) -> None:
        self.try_sync(force=True)

    def _on_finish(self) -> None:
        if self._sender is not None:
            self._stopping = True
            self._wake.set()
            self._sender.join()
            self._sender = None
        self.try_sync(force=True)
        LIVE.pop((self._backend.uri, self.run_id), None)
        if not self._online:
            log.warning(
                "run %s finished offline; its journal %s holds everything: deliver it with "
                "windtunnel.tracking.replay_journal(path, %r)",
                self.run_id,
                self.journal_path,
                self._backend.uri,
            )

    def try_sync(self, force: bool = False) -> None:
        """Deliver what MLflow lacks; swallow every error (the run goes on, offline)."""
        state = self._state
        if state is None:
            return
        with self._send_lock:
            try:
                if self._online and self._pending is not None:
                    with self._pending_lock:
                        pending, self._pending = self._pending, []
                    deliver(self._backend, state, (p for p in pending if p[1] > state.offset))
                    return
                if not force and time.monotonic() - self._last_try < RETRY_EVERY_S:
                    return
                self._last_try = time.monotonic()
                if not probe(self._backend.uri):
                    raise Offline(f"{self._backend.uri} does not answer")
                # collect in memory from here on, then read the file: an event written meanwhile
                # is in both, and delivered once (only events past the delivered offset are sent)
                with self._pending_lock:
                    self._pending = []
                deliver(self._backend, state, iter_events(self.journal_path, state.offset))
                if not self._online and self._warned_offline:
                    log.warning(
                        "MLflow at %s is back: run %s is up to date", state.uri, self.run_id
                    )
                self._online = True
            except Exception as e:
                self._go_offline(e)

    def _go_offline(self, exc: BaseException) -> None:
        if self._online or not self._warned_offline:
            log.warning(
                "MLflow at %s unreachable (%s): run %s goes on offline, journaling to %s; "
                "retrying every %.0f s",
                self._backend.uri,
                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                getattr(self, "run_id", None) or self.name,
                self.journal_path,
                RETRY_EVERY_S,
            )
            self._warned_offline = True
        with self._pending_lock:
            self._online, self._pending = False, None
        self._last_try = time.monotonic()


class MlflowTracker:
    """Tracker writing to MLflow at ``tracking_uri`` (plus each run's local journal)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str = "windtunnel",
        flush_every: int = 50,
        background: bool = True,
    ):
        self.tracking_uri = tracking_uri
        self.background = background
        self.experiment = experiment
        self.flush_every = flush_every
        self._backend = Backend(tracking_uri)

    def start_run(
        self,
        *,
        run_dir: Path,
        name: str,
        experiment: str | None = None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent: Any = None,
    ) -> MlflowRun:
        return MlflowRun(
            backend=self._backend,
            run_dir=run_dir,
            name=name,
            experiment=experiment or self.experiment,
            params=params,
            tags=tags,
            parent=parent,
            flush_every=self.flush_every,
            background=self.background,
        )
