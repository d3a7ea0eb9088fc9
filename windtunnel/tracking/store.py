"""MLflow's own client behind the :class:`~windtunnel.tracking.api.RestClient` interface, for
tracking URIs that name a store rather than a server (``sqlite:///…``, ``file:…``, a folder,
``databricks``), where there is no REST API to talk to.

The only module of reading runs back (:mod:`windtunnel.tracking.runs`) that imports mlflow, and
only when such a URI is used: answers are shaped like the REST API's JSON, and mlflow's errors
come out as :class:`~windtunnel.tracking.api.RestError`, so callers handle one kind of client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from windtunnel.tracking.api import RestError


@contextlib.contextmanager
def _rest_errors() -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise RestError(e.get_http_status_code(), str(e.error_code), e.message) from None


def _kvs(d: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": v} for k, v in d.items()]


def _experiment(exp: Any) -> dict[str, Any]:
    return {
        "experiment_id": exp.experiment_id,
        "name": exp.name,
        "artifact_location": exp.artifact_location,
        "lifecycle_stage": exp.lifecycle_stage,
    }


def _run(run: Any) -> dict[str, Any]:
    i = run.info
    return {
        "info": {
            "run_id": i.run_id,
            "run_name": i.run_name,
            "experiment_id": i.experiment_id,
            "status": i.status,
            "start_time": i.start_time,
            "end_time": i.end_time,
            "artifact_uri": i.artifact_uri,
            "lifecycle_stage": i.lifecycle_stage,
        },
        "data": {
            "metrics": _kvs(run.data.metrics),
            "params": _kvs(run.data.params),
            "tags": _kvs(run.data.tags),
        },
    }


class StoreClient:
    """What :mod:`windtunnel.tracking.runs` calls, through :class:`mlflow.MlflowClient`."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        with _rest_errors():
            self._client = MlflowClient(tracking_uri=uri)

    def get_experiment_by_name(self, name: str) -> dict[str, Any] | None:
        with _rest_errors():
            exp = self._client.get_experiment_by_name(name)
        return None if exp is None else _experiment(exp)

    def get_experiment(self, experiment_id: str) -> dict[str, Any] | None:
        try:
            with _rest_errors():
                return _experiment(self._client.get_experiment(experiment_id))
        except RestError as e:
            if e.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        with _rest_errors():
            return str(self._client.create_experiment(name, artifact_location=artifact_location))

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = (),
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        token = None
        while True:
            with _rest_errors():
                page = self._client.search_runs(
                    list(experiment_ids),
                    filter_string=filter_string,
                    max_results=page_size,
                    order_by=list(order_by) or None,
                    page_token=token,
                )
            for run in page:
                yield _run(run)
            token = page.token
            if not token:
                return

    def get_metric_history(
        self, run_id: str, key: str, *, page_size: int = 25_000
    ) -> list[dict[str, Any]]:
        with _rest_errors():
            history = self._client.get_metric_history(run_id, key)
        return [
            {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
            for m in history
        ]

    def create_run(
        self, experiment_id: str, *, start_time: int | None, tags: Mapping[str, str], run_name: str
    ) -> str:
        with _rest_errors():
            run = self._client.create_run(
                experiment_id, start_time=start_time, tags=dict(tags), run_name=run_name
            )
        return str(run.info.run_id)

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: list[dict[str, Any]] | None = None,
        params: list[dict[str, str]] | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        with _rest_errors():
            self._client.log_batch(
                run_id,
                metrics=[
                    Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
                    for m in metrics or []
                ],
                params=[Param(p["key"], p["value"]) for p in params or []],
                tags=[RunTag(t["key"], t["value"]) for t in tags or []],
            )

    def update_run(self, run_id: str, status: str, end_time: int | None = None) -> None:
        with _rest_errors():
            self._client.set_terminated(run_id, status, end_time)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        with _rest_errors():
            self._client.log_artifact(run_id, local_path, artifact_path)
