"""Back-tests (DESIGN stage 6): hold out model sizes, predict them from the rest.

Every error is reported next to its extrapolation factor (held-out compute over the largest
fitted compute), because an error at 1.3× says much less than one at 10×.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from windtunnel.scaling.errors import ScalingError, TooFewPointsError
from windtunnel.scaling.fit import fit_data_model
from windtunnel.scaling.validate import _group_close


@dataclass(frozen=True)
class BacktestResult:
    """Per held-out point: N, D, observed, predicted, relative error, extrapolation factor."""

    table: pd.DataFrame
    mode: str

    @property
    def mean_abs_error(self) -> float:
        return float(self.table["rel_error"].abs().mean())

    @property
    def max_abs_error(self) -> float:
        return float(self.table["rel_error"].abs().max())

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "mean_abs_rel_error": self.mean_abs_error,
            "max_abs_rel_error": self.max_abs_error,
            "points": self.table.to_dict(orient="records"),
        }


def backtest(
    df: pd.DataFrame,
    *,
    target: str = "loss",
    mode: str = "largest",
    **fit_kwargs: Any,
) -> BacktestResult:
    """``mode="largest"``: fit all but the largest model size, predict it.
    ``mode="each"``: leave each size out in turn (sizes at the ends are extrapolations)."""
    if mode not in ("largest", "each"):
        raise ScalingError(f"mode must be 'largest' or 'each', not {mode!r}")
    groups = _group_close(np.log(df["N"].to_numpy(dtype=float)), 1e-3)
    n_groups = int(groups.max()) + 1
    if n_groups < 3:
        raise TooFewPointsError(
            f"a back-test needs ≥3 model sizes (≥2 left to fit α); found {n_groups}"
        )
    N, D = df["N"].to_numpy(float), df["D"].to_numpy(float)
    C = df["C"].to_numpy(float) if "C" in df.columns else 6.0 * N * D
    held = [n_groups - 1] if mode == "largest" else list(range(n_groups))
    rows = []
    for g in held:
        test = groups == g
        fit = fit_data_model(df[~test], target=target, **fit_kwargs)
        pred = fit.predict(df.loc[test, "N"], df.loc[test, "D"])
        c_max = float(np.max(C[~test]))
        for (_, r), p, c in zip(df[test].iterrows(), pred, C[test]):
            rows.append(
                {
                    "N": float(r["N"]),
                    "D": float(r["D"]),
                    "observed": float(r[target]),
                    "predicted": float(p),
                    "rel_error": float(p / r[target] - 1.0),
                    "extrapolation": float(c / c_max),
                }
            )
    return BacktestResult(table=pd.DataFrame(rows), mode=mode)
