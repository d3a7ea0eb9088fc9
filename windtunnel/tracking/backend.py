"""The MLflow side of tracking: one client per URI, and what each journal has delivered.

The journal (``journal.jsonl``) is the source of truth and MLflow a replica. What has reached a
given tracking URI is recorded beside the journal in ``journal.synced``: the byte offset of the
last delivered event and the local → MLflow run-id map, per URI.

Runs talk to the server through :class:`~windtunnel.tracking.api.RestClient` (MLflow's REST API,
no ``import mlflow``: a trial process saves the 1–2 s that import costs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from windtunnel.files import atomic_write
from windtunnel.schema import FileModel, load_versioned
from windtunnel.tracking.api import RestClient, RestError, kv
from windtunnel.tracking.server import is_healthy

log = logging.getLogger("windtunnel.tracking")

SYNCED_NAME = "journal.synced"
PROBE_TIMEOUT_S = 2.0
MAX_METRICS, MAX_PARAMS_TAGS = 1000, 100
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000

CLIENT_ENV = {
    # An absent server must cost seconds, not MLflow's default 7 retries x 120 s timeouts.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # set_terminated would otherwise fetch the run and print a URL for every run.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""Set with ``os.environ.setdefault`` before the first client is made (a user's value wins)."""


class Offline(ConnectionError):
    """The tracking server cannot take the data now (unreachable, 5xx, waiting for a parent)."""


def configure_client_env() -> None:
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Cheap reachability check before paying for MLflow's own requests: any answer on
    ``/health`` below 500 counts (:func:`~windtunnel.tracking.server.is_healthy`, not strict)."""
    return is_healthy(uri, timeout, strict=False)


def is_transient(exc: BaseException) -> bool:
    """Connection trouble and server errors are retried later; a 4xx rejection is not."""
    if isinstance(exc, RestError):
        return exc.transient
    if isinstance(exc, OSError | TimeoutError):  # URLError, ConnectionError, socket timeouts
        return True
    mlflow_exc = sys.modules.get("mlflow.exceptions")  # only if an artifact call imported it
    if mlflow_exc is not None:
        if isinstance(exc, mlflow_exc.RestException):
            code = int(exc.get_http_status_code())
            return code >= 500 or code == 429
        if isinstance(exc, mlflow_exc.MlflowException):
            return True
    return type(exc).__module__.startswith(("requests", "urllib3", "http.client"))


# ----------------------------------------------------------------------------------------------
# delivery state (the sidecar)
# ----------------------------------------------------------------------------------------------


class SyncTarget(FileModel):
    offset: int = 0
    current: str | None = None
    runs: dict[str, str] = Field(default_factory=dict)
    experiment_ids: dict[str, str] = Field(default_factory=dict)


class SyncedFile(FileModel):
    """``journal.synced``: per tracking URI, how much of the journal it has received."""

    version: int = 1
    targets: dict[str, SyncTarget]


SYNCED_VERSION = 1


@dataclass
class SyncState:
    """How much of one journal one tracking URI has received."""

    path: Path
    uri: str
    offset: int = 0
    current: str | None = None
    """Local id of the run the events at ``offset`` belong to."""
    runs: dict[str, str] = field(default_factory=dict)
    """Local run id → MLflow run id."""
    experiment_ids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, journal: Path, uri: str) -> SyncState:
        path = journal.with_name(SYNCED_NAME)
        state = cls(path=path, uri=uri)
        if not path.is_file():
            return state
        # refused rather than resent from the start: MLflow would get every point twice
        synced, _ = load_versioned(
            path,
            {SYNCED_VERSION: SyncedFile},
            what="journal delivery record",
            fix="delete it to send the whole journal again (MLflow may then hold points twice)",
        )
        target = synced.targets.get(uri)
        if target:
            state.offset = target.offset
            state.current = target.current
            state.runs = dict(target.runs)
            state.experiment_ids = dict(target.experiment_ids)
        return state

    def save(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            assert isinstance(doc["targets"], dict)
        except (OSError, ValueError, KeyError, TypeError):
            doc = {"version": SYNCED_VERSION, "targets": {}}
        doc["targets"][self.uri] = {
            "offset": self.offset,
            "current": self.current,
            "runs": self.runs,
            "experiment_ids": self.experiment_ids,
        }
        atomic_write(self.path, json.dumps(doc, indent=1))


# ----------------------------------------------------------------------------------------------
# the MLflow side: one client per tracking URI
# ----------------------------------------------------------------------------------------------


class Backend:
    """A REST client bound to one tracking URI, with the experiments it has resolved."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        configure_client_env()
        self.client = RestClient(uri)
        self.experiments: dict[str, str] = {}
        self._warned: set[str] = set()

    def experiment_id(self, name: str) -> str:
        if name not in self.experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self.experiments[name] = self.client.create_experiment(name)
                    return self.experiments[name]
                except RestError as e:  # created by another process meanwhile
                    if e.transient:
                        raise
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
            if exp.get("lifecycle_stage") == "deleted":
                self.client.restore_experiment(exp["experiment_id"])
            self.experiments[name] = str(exp["experiment_id"])
        return self.experiments[name]

    def create_run(self, start: Mapping[str, Any], parent_mlflow_id: str | None) -> str:
        """Create the MLflow run of a journal ``start`` event, with its params; return its id."""
        exp_id = self.experiment_id(start["experiment"])
        tags = {
            **start.get("tags", {}),
            "mlflow.runName": start["name"],
            "wt.run_dir": str(start.get("run_dir", "")),
        }
        if parent_mlflow_id:
            tags["mlflow.parentRunId"] = parent_mlflow_id
        with contextlib.suppress(Exception):
            import getpass

            tags.setdefault("mlflow.user", getpass.getuser())
        mid = self.client.create_run(
            exp_id,
            start_time=start.get("t"),
            tags={k: str(v)[:MAX_TAG_LEN] for k, v in tags.items() if v != ""},
            run_name=start["name"],
        )
        local_id = start.get("run_id") or mid
        params = kv((k, str(v)[:MAX_PARAM_LEN]) for k, v in start.get("params", {}).items())
        self.client.log_batch(
            mid, params=params[:MAX_PARAMS_TAGS], tags=kv({"wt.run_id": local_id})
        )
        for i in range(MAX_PARAMS_TAGS, len(params), MAX_PARAMS_TAGS):
            self.client.log_batch(mid, params=params[i : i + MAX_PARAMS_TAGS])
        return mid

    def find_run(self, start: Mapping[str, Any]) -> str | None:
        """The MLflow run already created for this local run id (a lost sidecar), if any."""
        exp_id = self.experiment_id(start["experiment"])
        found = self.client.search_run_ids(
            exp_id, f"tags.`wt.run_id` = '{start['run_id']}'", max_results=1
        )
        return found[0] if found else None

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
