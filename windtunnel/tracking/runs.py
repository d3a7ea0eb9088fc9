"""Reading wind-tunnel runs back from MLflow (the points table of a ladder, loss curves) and
recording points and fits there. :mod:`windtunnel.scaling` takes the tables these return.

MLflow contract (the trainer's): a finished point is a run tagged ``wt.point = "true"``; tags
``wt.stage, wt.model, wt.width, wt.batch_tokens, wt.seed``; params ``optim.lr``,
``optim.batch_size``, ``data.seq_len``, ``model.d_model``, ``model.n_layers``; metrics (last
value) ``N``, ``tokens``, ``flops``, ``val_loss``, ``val_bpb``, ``val_loss/<d>``, ``val_bpb/<d>``.
The points table has the columns (those the runs have) ``N`` (non-embedding params), ``D``
(tokens), ``C`` (FLOPs), ``loss``, ``bpb``, ``loss/<d>``, ``bpb/<d>``, ``lr``, ``batch_size``,
``batch_tokens``, ``width``, ``n_layers``, ``seq_len``, ``stage``, ``model``, ``seed``,
``run_id``.

An HTTP tracking URI is read over MLflow's REST API (:class:`~windtunnel.tracking.api.RestClient`,
no ``import mlflow``); any other URI (``sqlite:///…``, ``file:…``) through mlflow's own client
(:class:`~windtunnel.tracking.store.StoreClient`). Trouble (an unreachable server, an unknown
experiment, a rejected request) is raised as :class:`RunsError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from windtunnel.tracking.api import RestClient, RestError, kv, metric
from windtunnel.tracking.server import is_healthy, tracking_uri

POINT_FILTER = "tags.`wt.point` = 'true'"
REACH_TIMEOUT_S = 3.0
EMPTY_POINTS = ("N", "D", "C", "loss", "bpb", "run_id")
CURVE_COLUMNS = ("run_id", "batch_tokens", "N", "tokens", "loss")

_METRICS = {"N": "N", "tokens": "D", "flops": "C", "val_loss": "loss", "val_bpb": "bpb"}
_PARAMS = {
    "optim.lr": "lr",
    "optim.batch_size": "batch_size",
    "data.seq_len": "seq_len",
    "model.d_model": "d_model",
    "model.n_layers": "n_layers",
}
_TAGS = {
    "wt.stage": "stage",
    "wt.model": "model",
    "wt.width": "width",
    "wt.batch_tokens": "batch_tokens",
    "wt.seed": "seed",
}
_NUMERIC = ("lr", "batch_size", "seq_len", "d_model", "n_layers", "width", "batch_tokens", "seed")


class RunsError(RuntimeError):
    """MLflow could not be read or written: unreachable, no such experiment, a rejected
    request. The message is one line, fit for a CLI's error output."""


class RunsClient(Protocol):
    """What this module calls: :class:`RestClient` (HTTP) or ``StoreClient`` (other URIs)."""

    uri: str

    def get_experiment_by_name(self, name: str) -> dict[str, Any] | None: ...

    def get_experiment(self, experiment_id: str) -> dict[str, Any] | None: ...

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str: ...

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = (),
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]: ...

    def get_metric_history(
        self, run_id: str, key: str, *, page_size: int = 25_000
    ) -> list[dict[str, Any]]: ...

    def create_run(
        self, experiment_id: str, *, start_time: int | None, tags: Mapping[str, str], run_name: str
    ) -> str: ...

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: list[dict[str, Any]] | None = None,
        params: list[dict[str, str]] | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> None: ...

    def update_run(self, run_id: str, status: str, end_time: int | None = None) -> None: ...

    def log_artifact(
        self, run_id: str, local_path: str, artifact_path: str | None = None
    ) -> None: ...


# -- clients and errors ------------------------------------------------------------------------


def client_for(uri: str | None = None) -> RunsClient:
    """A client for ``uri`` (default :func:`~windtunnel.tracking.server.tracking_uri`): REST for
    an HTTP server, which must answer within seconds; mlflow's own client for anything else."""
    uri = tracking_uri(uri)
    if not uri.startswith(("http://", "https://")):
        from windtunnel.tracking.store import StoreClient

        with _translated(uri):
            return StoreClient(uri)
    if not is_healthy(uri, REACH_TIMEOUT_S, strict=False):
        raise RunsError(
            f"cannot reach the MLflow tracking server at {uri}; start it, or pass "
            "--tracking-uri (or set MLFLOW_TRACKING_URI)"
        )
    return RestClient(uri)


@contextlib.contextmanager
def _translated(uri: str) -> Iterator[None]:
    try:
        yield
    except RestError as e:
        raise RunsError(f"MLflow at {uri} refused a request: {e}") from None
    except OSError as e:  # URLError, refused connections, timeouts
        raise RunsError(
            f"cannot reach the MLflow tracking server at {uri} ({type(e).__name__}: {e})"
        ) from None


def find_experiment(client: RunsClient, experiment: str) -> dict[str, Any]:
    """The experiment named ``experiment``, else the one with that id (all digits)."""
    with _translated(client.uri):
        exp = client.get_experiment_by_name(experiment)
        if exp is None and experiment.isdigit():
            exp = client.get_experiment(experiment)
    if exp is None:
        raise RunsError(f"no MLflow experiment named or numbered {experiment!r} at {client.uri}")
    return exp


# -- reading -----------------------------------------------------------------------------------


def _float(x: Any) -> float:
    """A metric value: MLflow's JSON spells non-finite ones as strings (``"NaN"``)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """One run (MLflow's JSON) → a flat row shaped like ``mlflow.search_runs``' frame:
    ``run_id``, ``run_name``, ``status``, ``start_time``, ``end_time``, ``metrics.<key>`` (last
    value), ``params.<key>``, ``tags.<key>``."""
    info, data = run.get("info", {}), run.get("data", {})
    row: dict[str, Any] = {
        "run_id": info.get("run_id") or info.get("run_uuid"),
        "run_name": info.get("run_name"),
        "status": info.get("status"),
        "start_time": info.get("start_time"),
        "end_time": info.get("end_time"),
    }
    row.update({f"metrics.{m['key']}": _float(m.get("value")) for m in data.get("metrics", [])})
    row.update({f"params.{p['key']}": p.get("value", "") for p in data.get("params", [])})
    row.update({f"tags.{t['key']}": t.get("value", "") for t in data.get("tags", [])})
    return row


def runs_frame(experiment: str, *, uri: str | None = None, filter_string: str = "") -> pd.DataFrame:
    """Every active run of an MLflow experiment (name or id) matching ``filter_string``, one
    flat row each (:func:`run_row`)."""
    client = client_for(uri)
    exp = find_experiment(client, experiment)
    with _translated(client.uri):
        rows = [run_row(r) for r in client.search_runs([exp["experiment_id"]], filter_string)]
    return pd.DataFrame(rows)


def _num(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def runs_to_table(runs: pd.DataFrame, *, finished_only: bool = True) -> pd.DataFrame:
    """Flat runs (:func:`runs_frame`, or ``mlflow.search_runs``' frame) → the points table
    (pure; testable without a server). Keeps runs tagged ``wt.point = true`` with no
    ``wt.failure`` tag, and (``finished_only``) status ``FINISHED``."""
    if runs.empty:
        return pd.DataFrame(columns=list(EMPTY_POINTS))
    r = runs
    if "tags.wt.point" in r.columns:
        r = r[r["tags.wt.point"].astype(str).str.lower() == "true"]
    if finished_only and "status" in r.columns:
        r = r[r["status"] == "FINISHED"]
    if "tags.wt.failure" in r.columns:
        r = r[r["tags.wt.failure"].isna() | (r["tags.wt.failure"].astype(str) == "")]
    out = pd.DataFrame(index=r.index)
    for m, col in _METRICS.items():
        if f"metrics.{m}" in r.columns:
            out[col] = _num(r[f"metrics.{m}"])
    if "N" not in out and "tags.wt.N" in r.columns:
        out["N"] = _num(r["tags.wt.N"])
    if "D" not in out and "tags.wt.D" in r.columns:
        out["D"] = _num(r["tags.wt.D"])
    for c in r.columns:
        for src, dst in (("metrics.val_loss/", "loss/"), ("metrics.val_bpb/", "bpb/")):
            if c.startswith(src):
                out[dst + c[len(src) :]] = _num(r[c])
    for p, col in _PARAMS.items():
        if f"params.{p}" in r.columns:
            out[col] = r[f"params.{p}"]
    for t, col in _TAGS.items():
        if f"tags.{t}" in r.columns:
            out[col] = r[f"tags.{t}"]
    for col in _NUMERIC:
        if col in out:
            out[col] = _num(out[col])
    if "width" not in out and "d_model" in out:
        out["width"] = out["d_model"]
    out["run_id"] = r["run_id"].to_numpy() if "run_id" in r.columns else np.arange(len(r))
    return out.reset_index(drop=True)


def runs_table(
    experiment: str, *, uri: str | None = None, finished_only: bool = True
) -> pd.DataFrame:
    """The finished points of an MLflow experiment (name or id) → the points table (raw: pass
    it through :func:`windtunnel.scaling.table.load_table` to rename columns or fill ``C``/``D``)."""
    runs = runs_frame(experiment, uri=uri, filter_string=POINT_FILTER)
    return runs_to_table(runs, finished_only=finished_only)


def curves_table(
    experiment: str, *, uri: str | None = None, metric: str = "val_loss"
) -> pd.DataFrame:
    """Loss curves in long form (``run_id, batch_tokens, N, tokens, loss``) for the batch-size
    law: the ``metric`` history of every run of the experiment tagged ``wt.batch_tokens``
    (fit runs and failed runs skipped), against the ``tokens`` metric logged at the same step
    (the step itself where there is none)."""
    client = client_for(uri)
    exp = find_experiment(client, experiment)
    rows: list[dict[str, Any]] = []
    with _translated(client.uri):
        for run in client.search_runs([exp["experiment_id"]]):
            flat = run_row(run)
            if flat.get("tags.wt.kind") == "fit" or "tags.wt.failure" in flat:
                continue
            bt = flat.get("tags.wt.batch_tokens")
            if bt is None:
                continue
            run_id = str(flat["run_id"])
            hist = client.get_metric_history(run_id, metric)
            if not hist:
                continue
            tokens = {
                int(m["step"]): _float(m.get("value"))
                for m in client.get_metric_history(run_id, "tokens")
            }
            n = flat.get("metrics.N", _float(flat.get("tags.wt.N", "nan")))
            for m in hist:
                step = int(m.get("step", 0))
                rows.append(
                    {
                        "run_id": run_id,
                        "batch_tokens": _float(bt),
                        "N": n,
                        "tokens": float(tokens.get(step, step)),
                        "loss": _float(m.get("value")),
                    }
                )
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


# -- writing -----------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_points(
    df: pd.DataFrame,
    experiment: str,
    *,
    uri: str | None = None,
    stage: str = "ladder",
    lr: float = 0.01,
    artifact_location: str | None = None,
) -> str:
    """Record each row of a points table (``N``, ``D``, ``loss``; ``C``, ``bpb`` optional) as a
    finished point run, the way the trainer does (tags ``wt.point``, ``wt.stage``, …; metrics
    ``N``, ``tokens``, ``flops``, ``val_loss``, ``val_bpb``, per domain ``…/english``): for demos,
    tests and importing outside results. Creates the experiment if needed (``artifact_location``,
    a folder or URI, keeps its artifacts out of the working directory); returns its id."""
    client = client_for(uri)
    with _translated(client.uri):
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            str(exp["experiment_id"])
            if exp
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )
        for i, r in enumerate(df.to_dict("records")):
            n, d = float(r["N"]), float(r["D"])
            d_model = int(64 * max(1, round((n / 12 / 3) ** 0.5 / 64)))
            t0 = _now_ms()
            run_id = client.create_run(
                exp_id,
                start_time=t0,
                run_name=f"point-{i}",
                tags={
                    "wt.point": "true",
                    "wt.stage": stage,
                    "wt.model": f"N{n:.3g}",
                    "wt.width": str(d_model),
                    "wt.batch_tokens": "65536",
                    "wt.seed": "0",
                    "mlflow.source.name": __name__,
                },
            )
            values = {"N": n, "tokens": d, "flops": float(r.get("C", 6 * n * d))}
            for col, key in (("loss", "val_loss"), ("bpb", "val_bpb")):
                if col in r:
                    values[key] = values[f"{key}/english"] = float(r[col])
            params = {
                "optim.lr": lr,
                "optim.batch_size": 32,
                "data.seq_len": 2048,
                "model.d_model": d_model,
            }
            client.log_batch(
                run_id,
                metrics=[metric(k, v, t0, 0) for k, v in values.items()],
                params=kv(params),
            )
            client.update_run(run_id, "FINISHED", _now_ms())
    return exp_id


FIT_METRICS = ("E", "A", "B", "alpha", "beta", "a", "b", "rms_log_residual", "n_points")


def log_fit(
    experiment: str,
    files: Sequence[Path],
    summary: Mapping[str, Any],
    *,
    uri: str | None = None,
) -> str:
    """Record a fit as a run of the experiment (tag ``wt.kind = fit``, so it is never read as
    a point): its scalar results as metrics ``fit.<name>``, ``files`` (the fit file, plots) as
    artifacts under ``fit/``. Returns the run id."""
    client = client_for(uri)
    exp = find_experiment(client, experiment)
    target = str(summary.get("target", "loss"))
    with _translated(client.uri):
        t0 = _now_ms()
        run_id = client.create_run(
            str(exp["experiment_id"]),
            start_time=t0,
            run_name=f"fit-{target}",
            tags={"wt.kind": "fit", "wt.target": target},
        )
        values = {
            f"fit.{k}": float(summary[k])
            for k in FIT_METRICS
            if isinstance(summary.get(k), int | float)
        }
        if values:
            client.log_batch(run_id, metrics=[metric(k, v, t0, 0) for k, v in values.items()])
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path="fit")
        client.update_run(run_id, "FINISHED", _now_ms())
    return run_id
