"""μTransfer with the resolution to decide (pure): does the optimal lr stay put as the model
widens, and can this sweep tell?

Per width, the optimum is the vertex of a parabola in log2(lr) fitted (weighted) through the
points of the basin around the best swept lr; its interval comes from a parametric bootstrap of
that fit with the loss noise estimated from seed repeats (same width and lr) when there are any,
else from the parabola's residuals (t-inflated for their few degrees of freedom). Across widths,
a weighted line of log2 lr* against log2 width gives the slope (0 when μP transfers the lr, −1
like standard parametrization) with its interval (inflated by the scatter beyond the optima's
own intervals).

Calibration on synthetic sweeps (5-point basins, factor-2 grid): the per-width 95% intervals
cover the true optimum 94% of the time on symmetric curves; a realistic skew (steeper on the
high-lr side) biases every width's vertex alike and lowers that to ~80%, while the slope's
interval, where the common bias cancels, kept its coverage (100 sweeps per case, 3 widths).

The verdict:

* **stable**: the optima agree within their intervals, ``|slope| ≤`` :data:`SLOPE_TOL` and its
  interval covers 0 and is narrow enough (half-width ≤ :data:`SLOPE_CI_MAX`) to have seen a
  drift;
* **not stable**: the slope's interval excludes 0 and ``|slope| >`` :data:`SLOPE_TOL`;
* **cannot tell**: the design misses a check (≥ :data:`MIN_LRS` lrs per width at ≤ ×2 spacing,
  width range ≥ ×4, ≥ 3 widths), an optimum lies at the edge of its grid or has an interval
  wider than the grid spacing (or none), or the slope's interval is too wide. The reason names
  what is missing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
from scipy import stats

from windtunnel.scaling.errors import InputError, TooFewPointsError

Verdict = Literal["stable", "not stable", "cannot tell"]

MIN_LRS = 5
"""lrs per width the design needs."""
MAX_SPACING = 2.0
"""Largest ratio between neighbouring lrs (factor-2 grid); 5% slack for rounded grids."""
MIN_WIDTH_RANGE = 4.0
"""Largest over smallest width."""
MIN_WIDTHS = 3
SLOPE_TOL = 0.1
"""|d log lr* / d log width| within which the lr counts as staying put."""
SLOPE_CI_MAX = 0.25
"""Half-width of the slope's interval above which a "stable" could not have seen a drift."""
BASIN_STEPS = 2
"""Grid points on each side of the best lr that may enter the parabola."""
BASIN_EXCESS = 0.25
"""A point whose loss exceeds the best by more than this fraction is outside the basin
(diverged or far off); the basin stops there."""
N_DRAWS = 2000


@dataclass(frozen=True)
class DesignCheck:
    """One requirement of the sweep's design, met or not."""

    name: str
    ok: bool
    have: str
    need: str


@dataclass(frozen=True)
class WidthOptimum:
    """The optimal lr at one width, with its interval."""

    width: float
    lr_opt: float
    lr_lo: float | None
    """Interval bounds; None where the sweep does not bound the optimum on that side."""
    lr_hi: float | None
    loss_opt: float
    n_lrs: int
    spacing: float
    """Largest ratio between neighbouring swept lrs."""
    n_basin: int
    """Points the parabola went through."""
    noise: float | None
    """Loss noise (standard deviation) the interval assumes."""
    noise_from: str
    """``seeds`` (repeats at one lr), ``residuals`` (of the parabola) or ``none``."""
    issue: str = ""
    """Why this optimum cannot decide (empty when it can)."""


@dataclass(frozen=True)
class TransferVerdict:
    """The μTransfer check's answer and what it rests on."""

    verdict: Verdict
    why: str
    optima: tuple[WidthOptimum, ...]
    slope: float | None
    slope_interval: tuple[float, float] | None
    design: tuple[DesignCheck, ...]
    level: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["optima"] = [asdict(o) for o in self.optima]
        d["design"] = [asdict(c) for c in self.design]
        return d


def _noise(groups: pd.DataFrame, level: float) -> float | None:
    """Pooled seed standard deviation over the lrs with repeats, t-inflated for its degrees of
    freedom (None without repeats)."""
    rep = groups[groups["n"] >= 2]
    dof = int((rep["n"] - 1).sum())
    if dof < 1:
        return None
    sd = math.sqrt(float(((rep["n"] - 1) * rep["var"]).sum()) / dof)
    return sd * _t_inflation(dof, level)


def _t_inflation(dof: int, level: float) -> float:
    """Student's t over the normal quantile: a standard deviation estimated from ``dof``
    degrees of freedom, widened so that normal intervals keep their coverage."""
    return float(stats.t.ppf(0.5 + level / 2, dof) / stats.norm.ppf(0.5 + level / 2))


def width_optimum(
    lr: Any, loss: Any, *, width: float = 0.0, level: float = 0.95, seed: int = 0
) -> WidthOptimum:
    """The optimum of one width's lr sweep (``lr`` and ``loss`` per run; repeats at one lr are
    seeds) with its ``level`` interval."""
    df = pd.DataFrame({"lr": np.asarray(lr, dtype=float), "y": np.asarray(loss, dtype=float)})
    df = df[np.isfinite(df["lr"]) & (df["lr"] > 0)]
    g = (
        df.groupby("lr")["y"]
        .agg(mean="mean", n="count", var="var")
        .reset_index()
        .sort_values("lr")
        .reset_index(drop=True)
    )
    x = np.log2(g["lr"].to_numpy(float))
    y = g["mean"].to_numpy(float)
    n = g["n"].to_numpy(float)
    spacing = float(2 ** np.max(np.diff(x))) if len(x) > 1 else math.inf
    finite = np.isfinite(y)
    if not finite.any():
        raise InputError(f"width {width:g}: no finite loss in its lr sweep")
    i = int(np.nanargmin(np.where(finite, y, np.inf)))
    edge = i in (0, len(x) - 1)
    ceiling = y[i] + BASIN_EXCESS * abs(y[i])
    lo = hi = i
    while lo - 1 >= max(0, i - BASIN_STEPS) and finite[lo - 1] and y[lo - 1] <= ceiling:
        lo -= 1
    while hi + 1 <= min(len(x) - 1, i + BASIN_STEPS) and finite[hi + 1] and y[hi + 1] <= ceiling:
        hi += 1
    sl = slice(lo, hi + 1)
    xb, yb, nb = x[sl] - x[i], y[sl], n[sl]
    seed_sd = _noise(g, level)

    def unresolved(issue: str, noise: float | None = None, src: str = "none") -> WidthOptimum:
        """The best swept lr, unbounded: this width cannot locate its optimum."""
        if noise is None and seed_sd is not None:
            noise, src = seed_sd, "seeds"
        return WidthOptimum(
            width=float(width), lr_opt=float(2 ** x[i]), lr_lo=None, lr_hi=None,
            loss_opt=float(y[i]), n_lrs=len(x), spacing=spacing, n_basin=len(xb),
            noise=noise, noise_from=src, issue=issue,
        )  # fmt: skip

    if edge:
        side = "smallest" if i == 0 else "largest"
        return unresolved(f"the best lr is the {side} swept: the optimum may lie beyond the grid")
    if len(xb) < 3:
        return unresolved(f"only {len(xb)} points in the basin around the best lr")
    X = np.stack([np.ones_like(xb), xb, xb * xb], axis=1)
    resid_sd, dof = None, len(xb) - 3
    w0 = nb  # a mean of n repeats has variance σ²/n
    coef = np.linalg.lstsq(X * np.sqrt(w0)[:, None], yb * np.sqrt(w0), rcond=None)[0]
    if dof >= 1:
        r = (yb - X @ coef) * np.sqrt(w0)
        resid_sd = math.sqrt(float(r @ r) / dof) * _t_inflation(dof, level)
    noise = max(s for s in (seed_sd, resid_sd, 0.0) if s is not None)
    src = "seeds" if seed_sd is not None and seed_sd >= (resid_sd or 0.0) else "residuals"
    c1, c2 = float(coef[1]), float(coef[2])
    if c2 <= 0:
        return unresolved("the basin is not convex (no minimum of the parabola)", noise, src)
    u = -c1 / (2 * c2)
    if not xb[0] <= u <= xb[-1]:
        return unresolved("the parabola's vertex lies outside the basin's points", noise, src)
    lr_opt = float(2 ** (x[i] + u))
    loss_opt = float(np.polyval([c2, c1, coef[0]], u))
    if seed_sd is None and resid_sd is None:  # an exact parabola: the vertex, no interval
        return dataclasses.replace(
            unresolved(
                f"{len(xb)} points in the basin and no seed repeats: no estimate of the noise"
            ),
            lr_opt=lr_opt,
            loss_opt=loss_opt,
        )
    # parametric bootstrap of the vertex: the fit's design is fixed, so every draw is one product
    W = np.sqrt(w0)
    P = np.linalg.pinv(X * W[:, None]) * W[None, :]
    rng = np.random.default_rng(seed)
    Y = (X @ coef)[None, :] + rng.standard_normal((N_DRAWS, len(xb))) * noise / np.sqrt(nb)
    C = Y @ P.T
    with np.errstate(divide="ignore", invalid="ignore"):
        us = np.where(C[:, 2] > 0, -C[:, 1] / (2 * C[:, 2]), np.where(C[:, 1] < 0, np.inf, -np.inf))
    us = np.clip(us, x[0] - x[i] - 10, x[-1] - x[i] + 10)
    q = (1 - level) / 2
    ulo, uhi = (float(v) for v in np.quantile(us, [q, 1 - q]))
    x_lo, x_hi = x[i] + ulo, x[i] + uhi
    lr_lo = float(2**x_lo) if x_lo >= x[0] else None
    lr_hi = float(2**x_hi) if x_hi <= x[-1] else None
    issue = ""
    if lr_lo is None or lr_hi is None:
        issue = "its interval reaches beyond the swept lrs"
    elif (x_hi - x_lo) / 2 > math.log2(spacing):
        issue = (
            f"its interval (×{2 ** ((x_hi - x_lo) / 2):.2f} each way) is wider than the grid "
            f"spacing (×{spacing:.2g})"
        )
    return WidthOptimum(
        width=float(width), lr_opt=lr_opt, lr_lo=lr_lo, lr_hi=lr_hi, loss_opt=loss_opt,
        n_lrs=len(x), spacing=spacing, n_basin=len(xb), noise=float(noise), noise_from=src,
        issue=issue,
    )  # fmt: skip


def design_checks(table: pd.DataFrame, *, width_col: str, lr_col: str) -> tuple[DesignCheck, ...]:
    """The sweep's design against what deciding needs (lrs, spacing, widths, width range)."""
    per = table.groupby(width_col)[lr_col]
    n_lrs = int(per.nunique().min())
    spacing = max(
        (
            float(2 ** np.max(np.diff(np.log2(np.sort(v.unique())))))
            for _, v in per
            if v.nunique() > 1
        ),
        default=math.inf,
    )
    widths = np.sort(table[width_col].unique().astype(float))
    wr = float(widths[-1] / widths[0]) if len(widths) else 1.0
    return (
        DesignCheck("lrs per width", n_lrs >= MIN_LRS, str(n_lrs), f"≥ {MIN_LRS}"),
        DesignCheck(
            "lr spacing", spacing <= MAX_SPACING * 1.05, f"×{spacing:.3g}", f"≤ ×{MAX_SPACING:g}"
        ),
        DesignCheck("widths", len(widths) >= MIN_WIDTHS, str(len(widths)), f"≥ {MIN_WIDTHS}"),
        DesignCheck(
            "width range", wr >= MIN_WIDTH_RANGE * 0.99, f"×{wr:.3g}", f"≥ ×{MIN_WIDTH_RANGE:g}"
        ),
    )


def _slope(opt: list[WidthOptimum], level: float) -> tuple[float, tuple[float, float] | None, bool]:
    """Weighted slope of log2 lr* on log2 width, its interval, and whether the optima agree
    within their intervals (no interval, and no agreement, when an optimum has no interval)."""
    x = np.log2([o.width for o in opt])
    y = np.log2([o.lr_opt for o in opt])
    z = float(stats.norm.ppf(0.5 + level / 2))
    bounds = [(o.lr_lo, o.lr_hi) for o in opt]
    known = [(lo, hi) for lo, hi in bounds if lo is not None and hi is not None]
    if len(known) < len(opt):
        sd = np.ones_like(x)
    else:
        sd = np.array([(math.log2(hi) - math.log2(lo)) / (2 * z) for lo, hi in known])
    w = 1.0 / np.maximum(sd, 1e-6) ** 2
    xm, ym = float(np.sum(w * x) / np.sum(w)), float(np.sum(w * y) / np.sum(w))
    sxx = float(np.sum(w * (x - xm) ** 2))
    slope = float(np.sum(w * (x - xm) * (y - ym)) / sxx)
    if len(known) < len(opt):
        return slope, None, False
    agree = max(lo for lo, _ in known) <= min(hi for _, hi in known) * (1 + 1e-9)
    se, q, dof = math.sqrt(1.0 / sxx), z, len(x) - 2
    chi2 = float(np.sum(w * (y - ym - slope * (x - xm)) ** 2)) / dof if dof >= 1 else 0.0
    if chi2 > 1:  # the optima scatter beyond their own intervals
        se *= math.sqrt(chi2)
        q = float(stats.t.ppf(0.5 + level / 2, dof))
    return slope, (slope - q * se, slope + q * se), agree


def transfer_verdict(
    df: pd.DataFrame,
    *,
    width_col: str = "width",
    lr_col: str = "lr",
    target: str = "loss",
    level: float = 0.95,
    seed: int = 0,
) -> TransferVerdict:
    """Per width the optimal lr with its interval, the slope across widths, and the verdict."""
    for col in (width_col, lr_col, target):
        if col not in df.columns:
            raise InputError(f"column {col!r} not in the table")
    tab = df[[width_col, lr_col, target]].dropna(subset=[width_col, lr_col])
    if tab[width_col].nunique() < 2:
        raise TooFewPointsError("the μTransfer check needs lr sweeps at ≥2 widths")
    design = design_checks(tab, width_col=width_col, lr_col=lr_col)
    optima = tuple(
        width_optimum(g[lr_col], g[target], width=float(cast(float, w)), level=level, seed=seed)
        for w, g in tab.groupby(width_col)
    )
    slope, ci, agree = _slope(list(optima), level)
    problems = [f"{c.name} {c.have} (need {c.need})" for c in design if not c.ok]
    by_issue: dict[str, list[str]] = {}
    for o in optima:
        if o.issue:
            by_issue.setdefault(o.issue, []).append(f"{o.width:g}")
    problems += [
        f"width{'s' if len(ws) > 1 else ''} {', '.join(ws)}: {issue}"
        for issue, ws in by_issue.items()
    ]
    pct = f"{level:.0%}"
    est = f"slope {slope:+.2f}" + (f" ({pct} interval {ci[0]:+.2f} to {ci[1]:+.2f})" if ci else "")
    if problems:
        verdict: Verdict = "cannot tell"
        why = f"{'; '.join(problems)}. The estimate so far: {est}"
    elif ci is None:
        verdict, why = "cannot tell", f"{est}: too few widths for an interval"
    elif (ci[0] > 0 or ci[1] < 0) and abs(slope) > SLOPE_TOL:
        verdict = "not stable"
        why = (
            f"the optimal lr moves as width^{slope:+.2f} ({pct} interval {ci[0]:+.2f} to "
            f"{ci[1]:+.2f}, excluding 0; tolerance ±{SLOPE_TOL:g})"
        )
    else:
        missing = []
        if not agree:
            missing.append("the optima disagree beyond their intervals")
        if abs(slope) > SLOPE_TOL:
            missing.append(
                f"|slope| {abs(slope):.3f} is above the tolerance {SLOPE_TOL:g} of a stable "
                "optimum, but its interval includes 0"
            )
        if ci[0] > 0 or ci[1] < 0:
            missing.append("the slope's interval excludes 0 (a small drift)")
        if (ci[1] - ci[0]) / 2 > SLOPE_CI_MAX:
            missing.append(
                f"the slope's interval is ±{(ci[1] - ci[0]) / 2:.2f} wide (> ±{SLOPE_CI_MAX:g}): "
                "a drift would not be seen; more seeds or lrs per width narrow it"
            )
        if missing:
            verdict, why = "cannot tell", f"{est}; {'; '.join(missing)}"
        else:
            verdict = "stable"
            why = (
                f"{est} within ±{SLOPE_TOL:g} and covering 0; the optima agree within their "
                "intervals"
            )
    return TransferVerdict(
        verdict=verdict,
        why=why,
        optima=optima,
        slope=slope,
        slope_interval=ci,
        design=design,
        level=level,
    )
