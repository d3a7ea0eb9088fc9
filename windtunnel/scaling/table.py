"""The run table: one row per finished point, from a DataFrame or a CSV/parquet file.

Columns (those the source has): ``N`` (non-embedding params), ``D`` (tokens), ``C`` (FLOPs),
``loss`` (= val_loss), ``bpb`` (= val_bpb), per domain ``loss/<domain>`` and ``bpb/<domain>``,
``lr``, ``batch_size``, ``batch_tokens``, ``width``, ``n_layers``, ``seq_len``, ``stage``,
``model``, ``seed``, ``run_id``.

Pure: no MLflow here. Points recorded in MLflow are read by :mod:`windtunnel.tracking.runs`
(``runs_table``, ``curves_table``), whose tables :func:`load_table` takes like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from windtunnel.scaling.errors import InputError


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


def load_curves(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Loss curves in long form (``run_id, batch_tokens, tokens, loss``, optionally ``N``) for
    the batch-size law, from a DataFrame or a CSV/parquet (from MLflow:
    :func:`windtunnel.tracking.runs.curves_table`)."""
    df = source.copy() if isinstance(source, pd.DataFrame) else read_file(source)
    missing = [c for c in ("run_id", "batch_tokens", "tokens", "loss") if c not in df]
    if missing:
        raise InputError(f"curve table {_name(source)} lacks column(s) {missing}")
    return df


def _name(source: str | Path | pd.DataFrame) -> str:
    return "(DataFrame)" if isinstance(source, pd.DataFrame) else str(source)


def is_mlflow_source(source: Any) -> bool:
    """True when ``source`` names an MLflow experiment rather than a table file or frame."""
    if isinstance(source, pd.DataFrame):
        return False
    s = str(source)
    return not (Path(s).exists() or Path(s).suffix.lower() in (".csv", ".parquet", ".pq", ".tsv"))


def load_table(
    source: str | Path | pd.DataFrame,
    *,
    columns: dict[str, str] | None = None,
    flops_per_param_token: float = 6.0,
) -> pd.DataFrame:
    """A DataFrame (e.g. :func:`windtunnel.tracking.runs.runs_table`'s) or a CSV/parquet path
    → the run table."""
    if isinstance(source, pd.DataFrame):
        return normalize(source, columns=columns, flops_per_param_token=flops_per_param_token)
    if is_mlflow_source(source):
        raise InputError(
            f"no such table file: {source} (an MLflow experiment is read with "
            "windtunnel.tracking.runs.runs_table)"
        )
    return read_file(source, columns=columns, flops_per_param_token=flops_per_param_token)
