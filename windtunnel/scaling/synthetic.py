"""Synthetic run tables (known law + noise) and a logger that writes them to MLflow the way the
trainer does — for tests, notebooks and benchmarks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from windtunnel.scaling.laws import DataModelLaw

LN2 = math.log(2.0)


def synthetic_points(
    law: DataModelLaw,
    sizes: Any,
    tokens_per_param: Any = (10, 20, 40, 60),
    *,
    noise: float = 0.0,
    seed: int = 0,
    bytes_per_token: float = 3.5,
) -> pd.DataFrame:
    """One row per (N, D = m·N) with ``loss = law · exp(noise·ε)``; ``bpb = loss / ln2 / bpt``."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, dtype=float)
    mults = np.asarray(tokens_per_param, dtype=float)
    N = np.repeat(sizes, len(mults))
    D = N * np.tile(mults, len(sizes))
    loss = law.predict(N, D) * np.exp(noise * rng.standard_normal(len(N)))
    return pd.DataFrame(
        {"N": N, "D": D, "C": 6 * N * D, "loss": loss, "bpb": loss / LN2 / bytes_per_token}
    )


def log_points_to_mlflow(
    df: pd.DataFrame,
    experiment: str,
    *,
    uri: str,
    stage: str = "ladder",
    lr: float = 0.01,
    artifact_location: str | None = None,
) -> str:
    """Log each row as a finished MLflow point run (tags ``wt.point``, metrics ``N``, ``tokens``,
    ``flops``, ``val_loss``, ``val_bpb``, per-domain ``val_bpb/english``); returns the
    experiment id. ``artifact_location`` (a folder or URI) keeps a new experiment's artifacts out of
    the working directory (MLflow's default for database stores is ``./mlruns``)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(experiment, artifact_location=artifact_location)
    )
    for i, r in df.reset_index(drop=True).iterrows():
        d_model = int(64 * max(1, round((r["N"] / 12 / 3) ** 0.5 / 64)))
        run = client.create_run(
            exp_id,
            run_name=f"point-{i}",
            tags={
                "wt.point": "true",
                "wt.stage": stage,
                "wt.model": f"N{r['N']:.3g}",
                "wt.width": str(d_model),
                "wt.batch_tokens": "65536",
                "wt.seed": "0",
            },
        )
        metrics = {
            "N": r["N"],
            "tokens": r["D"],
            "flops": r.get("C", 6 * r["N"] * r["D"]),
            "val_loss": r["loss"],
            "val_bpb": r["bpb"],
            "val_bpb/english": r["bpb"],
            "val_loss/english": r["loss"],
        }
        params = {
            "optim.lr": str(lr),
            "optim.batch_size": "32",
            "data.seq_len": "2048",
            "model.d_model": str(d_model),
        }
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("mlflow.source.name", "windtunnel.scaling.synthetic")],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
    return exp_id
