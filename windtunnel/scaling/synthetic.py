"""Synthetic run tables (known law + noise) for tests, notebooks and benchmarks. To record one in
MLflow the way the trainer records points: :func:`windtunnel.tracking.runs.log_points`."""

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
