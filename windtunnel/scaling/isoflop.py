"""Diagnostics: IsoFLOP profiles (approach 2), the frontier envelope (approach 1), L(C).

Approach 2 fits, per compute budget, a parabola of loss in ``log x`` (x = N or D) and takes its
minimum; power laws through the minima give ``N_opt ∝ C^a`` and ``D_opt ∝ C^b``. It is known to be
biased by the width and centring of the sampled grid, so it is a cross-check of approach 3, not
the answer. Approach 1 takes the lowest loss reached at each compute and fits power laws through
those frontier points. ``L(C) = L∞ + k·C^−γ`` is fitted to the frontier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from windtunnel.scaling.errors import InputError, TooFewPointsError
from windtunnel.scaling.laws import PowerLaw, SaturatingPowerLaw


def fit_power_law(x: Any, y: Any) -> PowerLaw:
    """Least squares line in log–log space (``np.polyfit``, unweighted): ``y = k·x^p``."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2 or len(np.unique(x[ok])) < 2:
        raise TooFewPointsError("a power law needs at least two points with distinct positive x")
    p, logk = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return PowerLaw(k=float(np.exp(logk)), p=float(p))


def group_budgets(C: Any, rtol: float = 0.05) -> np.ndarray:
    """Snap compute values to budgets: values within ``rtol`` (relative) share the group median."""
    C = np.asarray(C, dtype=float)
    order = np.argsort(C)
    labels = np.zeros(len(C), dtype=int)
    g = 0
    for i in range(1, len(order)):
        if np.log(C[order[i]] / C[order[i - 1]]) > rtol:
            g += 1
        labels[order[i]] = g
    snapped = np.empty(len(C))
    for k in range(g + 1):
        snapped[labels == k] = np.median(C[labels == k])
    return snapped


@dataclass(frozen=True)
class IsoFLOPResult:
    """Per-budget minima and the power laws through them."""

    profiles: pd.DataFrame
    """One row per budget: C, N_opt, D_opt, loss_opt, n_points, curvature, centred."""
    N_law: PowerLaw
    D_law: PowerLaw

    @property
    def a(self) -> float:
        return self.N_law.p

    @property
    def b(self) -> float:
        return self.D_law.p

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "N_coef": self.N_law.k,
            "D_coef": self.D_law.k,
            "profiles": self.profiles.to_dict(orient="records"),
        }


def isoflop_profiles(
    df: pd.DataFrame,
    *,
    target: str = "loss",
    x: str = "N",
    budget_col: str = "C",
    flops_per_param_token: float = 6.0,
    rtol: float = 0.05,
    min_points: int = 3,
) -> IsoFLOPResult:
    """Approach 2: a parabola of ``target`` in ``log x`` per budget; minima → power laws.

    ``x`` is ``N`` or ``D`` (the other is ``C / (k·x)``). Budgets are the distinct values of
    ``budget_col`` after snapping values within ``rtol``. A minimum outside the sampled range is
    kept but flagged ``centred=False`` (the classic bias of this approach).
    """
    for col in (target, x, budget_col):
        if col not in df.columns:
            raise InputError(f"column {col!r} not in the table")
    if x not in ("N", "D"):
        raise InputError("x must be 'N' or 'D'")
    C = group_budgets(df[budget_col].to_numpy(dtype=float), rtol)
    rows = []
    for c in np.unique(C):
        sel = c == C
        if sel.sum() < min_points:
            continue
        lx = np.log(df.loc[sel, x].to_numpy(dtype=float))
        y = df.loc[sel, target].to_numpy(dtype=float)
        q2, q1, _ = np.polyfit(lx, y, 2)
        if q2 <= 0:
            continue  # not a valley: no minimum
        lopt = -q1 / (2 * q2)
        xopt = float(np.exp(lopt))
        other = c / (flops_per_param_token * xopt)
        n_opt, d_opt = (xopt, other) if x == "N" else (other, xopt)
        rows.append(
            {
                "C": float(c),
                "N_opt": n_opt,
                "D_opt": d_opt,
                "loss_opt": float(np.polyval([q2, q1, _], lopt)),
                "n_points": int(sel.sum()),
                "curvature": float(q2),
                "centred": bool(lx.min() <= lopt <= lx.max()),
            }
        )
    prof = pd.DataFrame(rows)
    if len(prof) < 2:
        raise TooFewPointsError(
            f"IsoFLOP profiles need ≥2 budgets with ≥{min_points} points and a valley each; "
            f"found {len(prof)}"
        )
    return IsoFLOPResult(
        profiles=prof,
        N_law=fit_power_law(prof["C"], prof["N_opt"]),
        D_law=fit_power_law(prof["C"], prof["D_opt"]),
    )


def frontier(df: pd.DataFrame, *, target: str = "loss", c_col: str = "C") -> pd.DataFrame:
    """Approach 1: the points on the lower envelope (no cheaper point reaches a lower loss)."""
    d = df.sort_values(c_col)
    best = np.inf
    keep = []
    for idx, v in zip(d.index, d[target].to_numpy(dtype=float)):
        if v < best:
            keep.append(idx)
            best = v
    return df.loc[keep].sort_values(c_col)


@dataclass(frozen=True)
class EnvelopeResult:
    frontier: pd.DataFrame
    N_law: PowerLaw
    D_law: PowerLaw
    loss_law: SaturatingPowerLaw


def envelope(df: pd.DataFrame, *, target: str = "loss", c_col: str = "C") -> EnvelopeResult:
    """Approach 1 with power laws for N and D on the frontier and ``L(C)`` through it."""
    fr = frontier(df, target=target, c_col=c_col)
    if len(fr) < 3:
        raise TooFewPointsError(f"the frontier has {len(fr)} point(s); need ≥3 for approach 1")
    return EnvelopeResult(
        frontier=fr,
        N_law=fit_power_law(fr[c_col], fr["N"]),
        D_law=fit_power_law(fr[c_col], fr["D"]),
        loss_law=fit_loss_vs_compute(fr[c_col], fr[target]),
    )


def fit_loss_vs_compute(C: Any, L: Any) -> SaturatingPowerLaw:
    """``L(C) = L∞ + k·C^−γ`` by variable projection: for each γ, (L∞, k) by least squares on
    relative residuals (L∞ ≥ 0, k > 0); γ by a bounded 1-D search after a grid."""
    from scipy.optimize import minimize_scalar

    C = np.asarray(C, dtype=float)
    L = np.asarray(L, dtype=float)
    if len(C) < 3:
        raise TooFewPointsError("L(C) = L∞ + k·C^−γ needs at least 3 points")
    x = C / np.exp(np.mean(np.log(C)))  # scale for conditioning
    w = 1.0 / L

    def solve(g: float) -> tuple[float, np.ndarray]:
        X = np.stack([np.ones_like(x), x ** (-g)], axis=1) * w[:, None]
        y = L * w
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        if coef[0] < 0 or coef[1] <= 0:  # fall back to L∞ = 0
            k = float(np.dot(X[:, 1], y) / np.dot(X[:, 1], X[:, 1]))
            coef = np.array([0.0, max(k, 1e-300)])
        r = X @ coef - y
        return float(r @ r), coef

    gs = np.linspace(0.005, 3.0, 300)
    sse = [solve(g)[0] for g in gs]
    i = int(np.argmin(sse))
    lo, hi = gs[max(i - 1, 0)], gs[min(i + 1, len(gs) - 1)]
    res = minimize_scalar(lambda g: solve(g)[0], bounds=(lo, hi), method="bounded")
    g = float(res.x)
    (L_inf, k) = solve(g)[1]
    c0 = np.exp(np.mean(np.log(C)))
    return SaturatingPowerLaw(y_inf=float(L_inf), k=float(k * c0**g), gamma=g)
