"""Input checks of the data–model fit: typed errors that say what is wrong and what to do."""

from __future__ import annotations

import numpy as np

from windtunnel.scaling.errors import (
    InputError,
    NonFiniteError,
    NonPositiveError,
    NotIdentifiableError,
    TooFewPointsError,
)

MIN_POINTS = 6
"""Five parameters need at least six points (and more to say anything about the fit)."""


def _group_close(logx: np.ndarray, rtol: float) -> np.ndarray:
    """Labels grouping values whose logs differ by less than ``rtol`` (sorted chaining)."""
    order = np.argsort(logx)
    breaks = np.diff(logx[order]) > rtol
    labels = np.empty(len(logx), dtype=int)
    labels[order] = np.concatenate([[0], np.cumsum(breaks)])
    return labels


def validate_points(
    N: np.ndarray, D: np.ndarray, loss: np.ndarray, *, target: str = "loss", rtol: float = 1e-3
) -> None:
    """Raise a typed :class:`~windtunnel.scaling.errors.ScalingError` if the design cannot be fitted.

    Checks: equal lengths, enough points, finite and positive values, at least two distinct N
    and two distinct D, and not "one D per N on a smooth curve" (then α and β are confounded).
    Values within ``rtol`` (relative) count as equal.
    """
    arrays = {"N": N, "D": D, target: loss}
    if len({len(a) for a in arrays.values()}) != 1:
        raise InputError(f"N, D and {target} must have the same length")
    n = len(loss)
    if n < MIN_POINTS:
        raise TooFewPointsError(
            f"too few points: {n}; the law E + A/N^α + B/D^β has 5 parameters and needs at least "
            f"{MIN_POINTS} points (in practice ≥3 model sizes × ≥3 token counts)"
        )
    for name, a in arrays.items():
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise NonFiniteError(
                f"{bad.size} non-finite value(s) (NaN/inf) in column {name!r} at row(s) "
                f"{bad[:10].tolist()}{' …' if bad.size > 10 else ''}; drop or fix them"
            )
        bad = np.flatnonzero(a <= 0)
        if bad.size:
            raise NonPositiveError(
                f"{bad.size} non-positive value(s) in column {name!r} at row(s) "
                f"{bad[:10].tolist()}{' …' if bad.size > 10 else ''}: the law is fitted in log "
                f"space and needs N, D and {target} > 0"
            )
    gN = _group_close(np.log(N), rtol)
    gD = _group_close(np.log(D), rtol)
    if gN.max() == 0:
        raise NotIdentifiableError(
            f"α is not identifiable: all points have the same N ({N[0]:.4g}); "
            "train at least two (better ≥3) model sizes"
        )
    if gD.max() == 0:
        raise NotIdentifiableError(
            f"β is not identifiable: all points have the same D ({D[0]:.4g}); "
            "train each size to at least two (better ≥3) token counts"
        )
    d_per_n = np.bincount(np.unique(np.stack([gN, gD]), axis=1)[0])  # distinct D per N
    if d_per_n.max() == 1:
        lN, lD = np.log(N), np.log(D)
        deg = min(2, gN.max())
        coef = np.polyfit(lN, lD, deg)
        if np.max(np.abs(np.polyval(coef, lN) - lD)) < 0.01:
            raise NotIdentifiableError(
                "α and β are not separately identifiable: every model size has a single D and D "
                "is a smooth function of N (e.g. D = 20·N), so the N and D terms cannot be told "
                "apart; train each size to several token counts (WSD decay branches)"
            )
