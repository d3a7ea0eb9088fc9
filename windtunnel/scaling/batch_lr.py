"""Batch-size and learning-rate laws, and the μTransfer check (pure).

* MiniCPM's batch-size law ``bs_opt = k / L^γ`` (tokens; MiniCPM: 1.21e9 / L^6.24) with their
  iso-loss method: for each loss level, the tokens each batch size needs to reach it; a parabola
  of ``log tokens`` in ``log bs`` (per model size) gives the optimal batch size at that level; a
  line in log–log through (level, bs_opt) gives k and γ.
* DeepSeek LLM's compute laws ``η_opt = k·C^−p`` and ``B_opt = k·C^q``
  (DeepSeek: B = 0.292·C^0.3271, η = 0.3118·C^−0.125).
* μTransfer: under μP the optimal base lr must not move with width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd

from windtunnel.scaling.errors import InputError, ScalingError, TooFewPointsError
from windtunnel.scaling.isoflop import fit_power_law
from windtunnel.scaling.laws import PowerLaw

MINICPM_BATCH_LAW = {"k": 1.21e9, "gamma": 6.24}
"""MiniCPM's ``bs_opt = 1.21e9 / L^6.24`` (tokens, L in nats on their eval set)."""
DEEPSEEK_LR = PowerLaw(k=0.3118, p=-0.125)
DEEPSEEK_BATCH = PowerLaw(k=0.292, p=0.3271)


@dataclass(frozen=True)
class BatchSizeLaw:
    """``bs_opt(L) = k / L^gamma`` in tokens per step."""

    k: float
    gamma: float
    points: pd.DataFrame | None = None
    """The (level, group, bs_opt) points the law was fitted to."""

    def __call__(self, loss: Any) -> np.ndarray:
        return self.k / np.asarray(loss, dtype=float) ** self.gamma

    def to_dict(self) -> dict[str, Any]:
        """``k``, ``gamma`` and, when the points are known, the ``loss_range`` and ``bs_range``
        they span (the planner warns when it uses the law outside ``loss_range``)."""
        out: dict[str, Any] = {"k": self.k, "gamma": self.gamma}
        if self.points is not None and len(self.points):
            for key, col in (("loss_range", "level"), ("bs_range", "bs_opt")):
                v = self.points[col].to_numpy(dtype=float)
                out[key] = [float(v.min()), float(v.max())]
        return out


def fit_batch_size_law(loss: Any, bs_opt: Any) -> BatchSizeLaw:
    """Line in log–log space through (loss, optimal batch size)."""
    pl = fit_power_law(loss, bs_opt)
    return BatchSizeLaw(k=pl.k, gamma=-pl.p)


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, level: float) -> float:
    """First token count at which a loss curve reaches ``level`` (log-linear interpolation);
    NaN when it never does."""
    order = np.argsort(tokens)
    t, y = np.asarray(tokens, dtype=float)[order], np.asarray(loss, dtype=float)[order]
    below = np.flatnonzero(y <= level)
    if below.size == 0:
        return float("nan")
    i = int(below[0])
    if i == 0:
        return float("nan")  # already below at the first point: the crossing is not observed
    lt0, lt1 = np.log(t[i - 1]), np.log(t[i])
    frac = (y[i - 1] - level) / (y[i - 1] - y[i])
    return float(np.exp(lt0 + frac * (lt1 - lt0)))


def iso_loss_batch_sizes(
    curves: pd.DataFrame,
    levels: Any,
    *,
    run_col: str = "run_id",
    bs_col: str = "batch_tokens",
    tokens_col: str = "tokens",
    loss_col: str = "loss",
    group_col: str | None = "N",
) -> pd.DataFrame:
    """MiniCPM's iso-loss method: per loss level (and model size), the optimal batch size.

    ``curves`` holds loss curves in long form (one row per evaluation). For every level and group,
    the tokens each batch size needs to reach the level are found on its curve; a parabola of
    ``log tokens`` in ``log bs`` gives the optimum (needs ≥3 batch sizes reaching the level).
    """
    need = [run_col, bs_col, tokens_col, loss_col] + ([group_col] if group_col else [])
    missing = [c for c in need if c not in curves.columns]
    if missing:
        raise InputError(f"curve table lacks column(s) {missing}")
    groups = curves.groupby(group_col) if group_col else [(None, curves)]
    rows = []
    for gkey, g in groups:
        for level in np.atleast_1d(levels):
            pts = []
            for _, run in g.groupby(run_col):
                t = tokens_to_reach(run[tokens_col].to_numpy(), run[loss_col].to_numpy(), level)
                if np.isfinite(t):
                    pts.append((float(run[bs_col].iloc[0]), t))
            if len({p[0] for p in pts}) < 3:
                continue
            lb = np.log([p[0] for p in pts])
            lt = np.log([p[1] for p in pts])
            q2, q1, _ = np.polyfit(lb, lt, 2)
            if q2 <= 0:
                continue
            lopt = -q1 / (2 * q2)
            rows.append(
                {
                    "level": float(level),
                    "group": gkey,
                    "bs_opt": float(np.exp(lopt)),
                    "tokens_opt": float(np.exp(np.polyval([q2, q1, _], lopt))),
                    "n_batch_sizes": len(pts),
                    "centred": bool(lb.min() <= lopt <= lb.max()),
                }
            )
    return pd.DataFrame(rows)


def batch_size_law_iso_loss(curves: pd.DataFrame, levels: Any, **kwargs: Any) -> BatchSizeLaw:
    """Iso-loss optima (:func:`iso_loss_batch_sizes`) → ``bs_opt = k / L^γ``."""
    pts = iso_loss_batch_sizes(curves, levels, **kwargs)
    if len(pts) < 2:
        raise TooFewPointsError(
            f"the batch-size law needs ≥2 iso-loss optima; found {len(pts)} (each level needs ≥3 "
            "batch sizes that reach it, with a minimum in tokens)"
        )
    law = fit_batch_size_law(pts["level"], pts["bs_opt"])
    if not law.gamma > 0:
        raise ScalingError(
            f"the iso-loss optima give bs_opt ∝ L^{-law.gamma:.3g}, a batch that shrinks as the "
            f"loss falls ({len(pts)} optima over losses {pts['level'].min():.3g}–"
            f"{pts['level'].max():.3g}): not a batch-size law; the levels are too close or "
            "reached by too few sizes — add sizes or batch sizes, or longer runs"
        )
    return BatchSizeLaw(k=law.k, gamma=law.gamma, points=pts)


def fit_compute_laws(C: Any, lr_opt: Any = None, bs_opt: Any = None) -> dict[str, PowerLaw]:
    """DeepSeek's ``η_opt = k·C^−p`` and ``B_opt = k·C^q`` (power laws in compute)."""
    out = {}
    if lr_opt is not None:
        out["lr"] = fit_power_law(C, lr_opt)
    if bs_opt is not None:
        out["batch"] = fit_power_law(C, bs_opt)
    if not out:
        raise InputError("give lr_opt and/or bs_opt")
    return out


@dataclass(frozen=True)
class MuTransferCheck:
    """Optimal lr per width and whether it stays put."""

    table: pd.DataFrame
    """width, lr_opt, loss_opt, n_lrs, interior (the optimum is inside the swept range)."""
    slope: float
    """d log lr_opt / d log width (0 under perfect transfer; −1 is SP-like)."""
    spread: float
    """max/min of lr_opt across widths."""
    stable: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "slope": self.slope,
            "spread": self.spread,
            "stable": self.stable,
            "table": self.table.to_dict(orient="records"),
        }


def mutransfer_check(
    df: pd.DataFrame,
    *,
    width_col: str = "width",
    lr_col: str = "lr",
    target: str = "loss",
    max_slope: float = 0.15,
    max_spread: float = 2.0,
) -> MuTransferCheck:
    """Per width, the optimal lr (parabola in log lr around the best point; the best swept lr
    when the sweep has <3 points); stable if ``|slope| ≤ max_slope`` and the optima are within a
    factor ``max_spread`` of each other."""
    for col in (width_col, lr_col, target):
        if col not in df.columns:
            raise InputError(f"column {col!r} not in the table")
    rows = []
    for w, g in df.groupby(width_col):
        g = g.groupby(lr_col, as_index=False)[[target]].mean().sort_values(lr_col)
        llr = np.log(g[lr_col].to_numpy(dtype=float))
        y = g[target].to_numpy(dtype=float)
        i = int(np.argmin(y))
        lopt, yopt = llr[i], y[i]
        interior = 0 < i < len(y) - 1
        if len(y) >= 3 and interior:
            sl = slice(max(i - 2, 0), min(i + 3, len(y)))
            q2, q1, q0 = np.polyfit(llr[sl], y[sl], 2)
            if q2 > 0:
                lopt = float(np.clip(-q1 / (2 * q2), llr.min(), llr.max()))
                yopt = float(np.polyval([q2, q1, q0], lopt))
        rows.append(
            {
                "width": float(cast("float", w)),
                "lr_opt": float(np.exp(lopt)),
                "loss_opt": float(yopt),
                "n_lrs": len(y),
                "interior": bool(interior),
            }
        )
    table = pd.DataFrame(rows)
    if len(table) < 2:
        raise TooFewPointsError("the μTransfer check needs lr sweeps at ≥2 widths")
    slope = fit_power_law(table["width"], table["lr_opt"]).p
    spread = float(table["lr_opt"].max() / table["lr_opt"].min())
    stable = abs(slope) <= max_slope and spread <= max_spread and bool(table["interior"].all())
    return MuTransferCheck(table=table, slope=float(slope), spread=spread, stable=stable)
