"""A small client for MLflow's REST API: what the run journal and reading runs back need,
without ``import mlflow``.

Importing mlflow costs a trial process 1–2 s of CPU (measured, docs/benchmarks.md), which is a
share of a short proxy trial worth saving: every trial creates a run, logs a batch of params,
sends metric batches and ends the run, all of which are a handful of JSON requests. The endpoints
are MLflow's public REST API 2.0 (``/api/2.0/mlflow/...``), which every MLflow server speaks.

Artifacts are written straight into the run's ``artifact_uri`` when it is a local path (the
project's server, started by :func:`windtunnel.tracking.ensure_server`, stores them so); for any
other artifact store (S3, a proxied ``mlflow-artifacts:`` root) the call is handed to mlflow's own
client, imported only then.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

API = "/api/2.0/mlflow"


def request_timeout_s() -> float:
    """MLflow's own knob (``MLFLOW_HTTP_REQUEST_TIMEOUT``), 10 s unless the user set it."""
    return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"))


class RestError(RuntimeError):
    """The server answered with an error: ``status`` is the HTTP code, ``code`` MLflow's
    ``error_code`` (e.g. ``RESOURCE_ALREADY_EXISTS``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code

    @property
    def transient(self) -> bool:
        return self.status >= 500 or self.status == 429


def _number(x: float) -> float | str:
    """MLflow's JSON (protobuf) spells non-finite doubles as strings."""
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def kv(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[dict[str, str]]:
    pairs = items.items() if isinstance(items, Mapping) else items
    return [{"key": k, "value": str(v)} for k, v in pairs]


def metric(key: str, value: float, timestamp: int, step: int) -> dict[str, Any]:
    return {"key": key, "value": _number(float(value)), "timestamp": int(timestamp), "step": step}


class RestClient:
    """The subset of :class:`mlflow.MlflowClient` that delivering a journal and reading runs
    back (:mod:`windtunnel.tracking.runs`) use. Answers are MLflow's JSON as dicts (a run is
    ``{"info": {...}, "data": {"metrics": [{"key", "value", ...}], "params": [...],
    "tags": [...]}}``)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self._artifact_uris: dict[str, str] = {}
        self._mlflow: Any = None

    # -- transport --------------------------------------------------------------------------
    def call(self, method: str, endpoint: str, body: Mapping[str, Any] | None = None) -> Any:
        url = f"{self.uri}{API}/{endpoint}"
        data = None
        if method == "GET" and body:
            url += "?" + urllib.parse.urlencode(body)
        elif body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=request_timeout_s()) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read() or b"{}")
            except ValueError:
                err = {}
            raise RestError(
                e.code, err.get("error_code", "HTTP_ERROR"), err.get("message", e.reason)
            ) from None
        return json.loads(raw) if raw else {}

    # -- experiments ------------------------------------------------------------------------
    def get_experiment_by_name(self, name: str) -> dict[str, Any] | None:
        return self._experiment("experiments/get-by-name", {"experiment_name": name})

    def get_experiment(self, experiment_id: str) -> dict[str, Any] | None:
        return self._experiment("experiments/get", {"experiment_id": experiment_id})

    def _experiment(self, endpoint: str, query: Mapping[str, str]) -> dict[str, Any] | None:
        """The experiment the query names, None when there is none."""
        try:
            exp: dict[str, Any] = self.call("GET", endpoint, query)["experiment"]
        except RestError as e:
            if e.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return exp

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        body = {"name": name}
        if artifact_location:
            body["artifact_location"] = artifact_location
        return str(self.call("POST", "experiments/create", body)["experiment_id"])

    def restore_experiment(self, experiment_id: str) -> None:
        self.call("POST", "experiments/restore", {"experiment_id": experiment_id})

    # -- runs -------------------------------------------------------------------------------
    def create_run(
        self, experiment_id: str, *, start_time: int | None, tags: Mapping[str, str], run_name: str
    ) -> str:
        body: dict[str, Any] = {
            "experiment_id": experiment_id,
            "tags": kv(tags),
            "run_name": run_name,
        }
        if start_time is not None:
            body["start_time"] = int(start_time)
        info = self.call("POST", "runs/create", body)["run"]["info"]
        self._artifact_uris[info["run_id"]] = info.get("artifact_uri", "")
        return str(info["run_id"])

    def search_run_ids(self, experiment_id: str, filter_string: str, max_results: int) -> list[str]:
        runs = self.search_runs([experiment_id], filter_string, page_size=max_results)
        return [r["info"]["run_id"] for r in itertools.islice(runs, max_results)]

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = (),
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Every active run of the experiments that matches ``filter_string``, fetched page by
        page (``page_size`` runs a request, at most 50000)."""
        token = ""
        while True:
            body: dict[str, Any] = {
                "experiment_ids": list(experiment_ids),
                "filter": filter_string,
                "max_results": page_size,
                "order_by": list(order_by),
            }
            if token:
                body["page_token"] = token
            page = self.call("POST", "runs/search", body)
            yield from page.get("runs", [])
            token = page.get("next_page_token", "")
            if not token:
                return

    def get_run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.call("GET", "runs/get", {"run_id": run_id})["run"]
        return run

    def get_metric_history(
        self, run_id: str, key: str, *, page_size: int = 25_000
    ) -> list[dict[str, Any]]:
        """Every point of metric ``key`` of the run (``{"key", "value", "timestamp", "step"}``;
        a non-finite value comes as the string ``"NaN"``/``"Infinity"``), page by page."""
        points: list[dict[str, Any]] = []
        token = ""
        while True:
            query: dict[str, Any] = {"run_id": run_id, "metric_key": key, "max_results": page_size}
            if token:
                query["page_token"] = token
            page = self.call("GET", "metrics/get-history", query)
            points.extend(page.get("metrics", []))
            token = page.get("next_page_token", "")
            if not token:
                return points

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: list[dict[str, Any]] | None = None,
        params: list[dict[str, str]] | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> None:
        body = {
            "run_id": run_id,
            "metrics": metrics or [],
            "params": params or [],
            "tags": tags or [],
        }
        self.call("POST", "runs/log-batch", body)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.call("POST", "runs/set-tag", {"run_id": run_id, "key": key, "value": value})

    def update_run(self, run_id: str, status: str, end_time: int | None = None) -> None:
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if end_time is not None:
            body["end_time"] = int(end_time)
        self.call("POST", "runs/update", body)

    # -- artifacts --------------------------------------------------------------------------
    def artifact_dir(self, run_id: str) -> Path | None:
        """The run's artifact folder when the store is a local path, else None."""
        if run_id not in self._artifact_uris:
            info = self.call("GET", "runs/get", {"run_id": run_id})["run"]["info"]
            self._artifact_uris[run_id] = info.get("artifact_uri", "")
        uri = self._artifact_uris[run_id]
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme == "file":
            return Path(urllib.parse.unquote(parsed.path))
        if not parsed.scheme and uri.startswith("/"):
            return Path(uri)
        return None

    def _mlflow_client(self) -> Any:
        if self._mlflow is None:
            from mlflow import MlflowClient

            self._mlflow = MlflowClient(tracking_uri=self.uri)
        return self._mlflow

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        folder = self.artifact_dir(run_id)
        if folder is None:
            self._mlflow_client().log_dict(run_id, obj, artifact_file)
            return
        path = folder / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(obj, default_flow_style=False))
        else:
            path.write_text(json.dumps(obj, indent=2))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        folder = self.artifact_dir(run_id)
        if folder is None:
            self._mlflow_client().log_artifact(run_id, local_path, artifact_path)
            return
        dest = folder / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local_path, dest / Path(local_path).name)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        folder = self.artifact_dir(run_id)
        if folder is None:
            self._mlflow_client().log_artifacts(run_id, local_dir, artifact_path)
            return
        shutil.copytree(local_dir, folder / (artifact_path or ""), dirs_exist_ok=True)
