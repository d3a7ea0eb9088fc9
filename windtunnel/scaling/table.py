"""The run table: one row per finished point, from MLflow or from CSV/parquet.

Columns (those the source has): ``N`` (non-embedding params), ``D`` (tokens), ``C`` (FLOPs),
``loss`` (= val_loss), ``bpb`` (= val_bpb), per domain ``loss/<domain>`` and ``bpb/<domain>``,
``lr``, ``batch_size``, ``batch_tokens``, ``width``, ``n_layers``, ``seq_len``, ``stage``,
``model``, ``seed``, ``run_id``.

MLflow contract (the trainer's): a finished point is a run tagged ``wt.point = "true"``; tags
``wt.stage, wt.model, wt.width, wt.batch_tokens, wt.seed``; params ``optim.lr``,
``optim.batch_size``, ``data.seq_len``, ``model.d_model``, ``model.n_layers``; metrics (last
value) ``N``, ``tokens``, ``flops``, ``val_loss``, ``val_bpb``, ``val_loss/<d>``, ``val_bpb/<d>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from windtunnel.scaling.errors import InputError

DEFAULT_TRACKING_URI = "http://127.0.0.1:5055"

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


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the local server ``http://127.0.0.1:5055``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def normalize(
    df: pd.DataFrame,
    *,
    columns: dict[str, str] | None = None,
    flops_per_param_token: float = 6.0,
) -> pd.DataFrame:
    """Rename columns (``columns`` maps *our* name → the table's name, e.g. ``{"N": "params"}``)
    and fill ``D = C/(k·N)`` or ``C = k·N·D`` when one of them is missing (k = 6 by default)."""
    out = df.copy()
    for ours, theirs in (columns or {}).items():
        if theirs not in out.columns:
            raise InputError(
                f"--{ours.lower()}-col names column {theirs!r}, which the table lacks; it has: "
                f"{', '.join(map(str, out.columns))}"
            )
        if ours != theirs:
            out[ours] = out[theirs]
    for col in ("N", "D", "C"):
        if col in out.columns:  # int64 products overflow silently past 9.2e18 (C = 6ND)
            out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    has = set(out.columns)
    if "D" not in has and {"C", "N"} <= has:
        out["D"] = out["C"] / (flops_per_param_token * out["N"])
    if "C" not in has and {"N", "D"} <= has:
        out["C"] = flops_per_param_token * out["N"] * out["D"]
    return out


def read_file(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """CSV or parquet → normalized table."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {p}")
    if p.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(p)
    elif p.suffix.lower() in (".csv", ".tsv", ".txt"):
        df = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",")
    else:
        raise InputError(f"unknown table format {p.suffix!r}; use .csv or .parquet")
    return normalize(df, **kwargs)


def _num(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def runs_to_table(runs: pd.DataFrame, *, finished_only: bool = True) -> pd.DataFrame:
    """``mlflow.search_runs`` output → the run table (pure; testable without a server)."""
    if runs.empty:
        return pd.DataFrame(columns=["N", "D", "C", "loss", "bpb", "run_id"])
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


def _check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when an HTTP server is not there."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", port), timeout=timeout):
            pass
    except OSError:
        raise InputError(
            f"cannot reach the MLflow tracking server at {uri}; start it, or pass "
            "--tracking-uri (or set MLFLOW_TRACKING_URI)"
        ) from None


def read_mlflow(
    experiment: str,
    *,
    uri: str | None = None,
    finished_only: bool = True,
) -> pd.DataFrame:
    """Finished points of an MLflow experiment (name or id) → the run table."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _check_reachable(tracking_uri(uri))
    client = MlflowClient(tracking_uri=tracking_uri(uri))
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None and experiment.isdigit():
            exp = client.get_experiment(experiment)
    except MlflowException as e:
        raise InputError(f"cannot read MLflow at {tracking_uri(uri)}: {e}") from None
    except Exception as e:  # connection errors come as many types
        raise InputError(
            f"cannot reach the MLflow tracking server at {tracking_uri(uri)} "
            f"({type(e).__name__}); start it or pass --tracking-uri"
        ) from None
    if exp is None:
        raise InputError(
            f"no MLflow experiment named or numbered {experiment!r} at {tracking_uri(uri)}"
        )
    rows, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.`wt.point` = 'true'",
            max_results=5000,
            page_token=token,
        )
        for run in page:
            row = {"run_id": run.info.run_id, "status": run.info.status}
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    return runs_to_table(pd.DataFrame(rows), finished_only=finished_only)


def read_curves(
    source: str | Path,
    *,
    uri: str | None = None,
    metric: str = "val_loss",
) -> pd.DataFrame:
    """Loss curves in long form (``run_id, batch_tokens, N, tokens, loss``) for the batch-size
    law: from a CSV/parquet with those columns, or from the evaluation history of every run of
    an MLflow experiment (``metric`` against the ``tokens`` metric logged at the same step)."""
    if not is_mlflow_source(source):
        df = read_file(source)
        missing = [c for c in ("run_id", "batch_tokens", "tokens", "loss") if c not in df]
        if missing:
            raise InputError(f"curve table {source} lacks column(s) {missing}")
        return df
    from mlflow.tracking import MlflowClient

    _check_reachable(tracking_uri(uri))
    client = MlflowClient(tracking_uri=tracking_uri(uri))
    exp = client.get_experiment_by_name(str(source))
    if exp is None and str(source).isdigit():
        exp = client.get_experiment(str(source))
    if exp is None:
        raise InputError(f"no MLflow experiment named or numbered {source!r}")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        tags = run.data.tags
        if tags.get("wt.kind") == "fit" or "wt.failure" in tags:
            continue
        hist = client.get_metric_history(run.info.run_id, metric)
        tok = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "tokens")}
        bt = tags.get("wt.batch_tokens")
        if not hist or bt is None:
            continue
        N = run.data.metrics.get("N", float(tags.get("wt.N", "nan")))
        for m in hist:
            rows.append(
                {
                    "run_id": run.info.run_id,
                    "batch_tokens": float(bt),
                    "N": N,
                    "tokens": float(tok.get(m.step, m.step)),
                    "loss": float(m.value),
                }
            )
    return pd.DataFrame(rows, columns=["run_id", "batch_tokens", "N", "tokens", "loss"])


def is_mlflow_source(source: Any) -> bool:
    """True when ``source`` names an MLflow experiment rather than a table file or frame."""
    if isinstance(source, pd.DataFrame):
        return False
    s = str(source)
    return not (Path(s).exists() or Path(s).suffix.lower() in (".csv", ".parquet", ".pq", ".tsv"))


def log_fit_to_mlflow(
    experiment: str, files: list[Path], summary: dict[str, Any], *, uri: str | None = None
) -> str:
    """Record a fit as a run (tag ``wt.kind = fit``) in the experiment: scalar results as
    metrics, the fit file and plots as artifacts. Returns the run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment) or client.get_experiment(experiment)
    run = client.create_run(
        exp.experiment_id,
        run_name=f"fit-{summary.get('target', 'loss')}",
        tags={"wt.kind": "fit", "wt.target": str(summary.get("target", "loss"))},
    )
    for k in ("E", "A", "B", "alpha", "beta", "a", "b", "rms_log_residual", "n_points"):
        if isinstance(summary.get(k), (int, float)):
            client.log_metric(run.info.run_id, f"fit.{k}", float(summary[k]))
    for f in files:
        client.log_artifact(run.info.run_id, str(f), artifact_path="fit")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def load_table(
    source: str | Path | pd.DataFrame,
    *,
    columns: dict[str, str] | None = None,
    uri: str | None = None,
    flops_per_param_token: float = 6.0,
) -> pd.DataFrame:
    """A DataFrame, a CSV/parquet path, or an MLflow experiment name or id → the run table."""
    if isinstance(source, pd.DataFrame):
        return normalize(source, columns=columns, flops_per_param_token=flops_per_param_token)
    s = str(source)
    if not is_mlflow_source(s):
        return read_file(s, columns=columns, flops_per_param_token=flops_per_param_token)
    table = read_mlflow(s, uri=uri)
    return normalize(table, columns=columns, flops_per_param_token=flops_per_param_token)
