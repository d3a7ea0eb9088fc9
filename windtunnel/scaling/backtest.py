"""Back-tests (DESIGN §9): hold out model sizes, predict them from the rest, with intervals.

Modes:

- ``rollout`` — expanding window: for every k ≥ ``min_fit_sizes`` (3), fit the k smallest sizes
  and predict every point of every larger size. This is how a ladder is used (fit the small
  rungs, predict the big run), rung by rung.
- ``largest`` — fit all sizes but the largest, predict it (the last fold of the rollout).
- ``each`` — leave each size out in turn (sizes at the ends are extrapolations, the others
  interpolations).

Every prediction carries a prediction interval (:mod:`windtunnel.scaling.intervals`: bootstrap
replicates of the fold's fit, its residuals, seed noise from repeated points) and every error is
reported next to its compute extrapolation factor: the point's compute (the table's ``C``, else
6ND) over the largest compute the fold was fitted on — an error at 1.3× says much less than one
at 10×. **Coverage** is the share of held-out points inside their interval; for honest intervals
it is close to the nominal level (0.9).

A fold whose fit puts a parameter at a bound (E ≈ 0, an exponent at its limit), whose bootstrap
failed or collapsed, is flagged on each of its points (``flags``) and in :attr:`folds`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from windtunnel.scaling.bootstrap import bootstrap_points
from windtunnel.scaling.errors import ConvergenceError, ScalingError, TooFewPointsError
from windtunnel.scaling.fit import DataModelFit, fit_data_model
from windtunnel.scaling.intervals import NOISE_FLOOR, NoiseModel, predictive_intervals
from windtunnel.scaling.validate import _group_close

MODES = ("rollout", "largest", "each")
DEFAULT_BOOT = 50
"""Bootstrap refits per fold: enough for a 90% interval's quantiles together with the residual
draws (B × n predictive draws per point), few enough that a rollout stays a few seconds."""
RETRY_MAXITER = 20_000
"""A fold whose fit runs out of L-BFGS-B iterations is refitted once with this many."""
BUCKETS: tuple[tuple[float, float, str], ...] = (
    (0.0, 1.0, "<1×"),
    (1.0, 2.0, "1–2×"),
    (2.0, 10.0, "2–10×"),
    (10.0, math.inf, "≥10×"),
)
THRESHOLDS = (1.0, 2.0, 10.0)
"""Cumulative summaries: every point at ≥ this extrapolation factor."""
FLAG_LEGEND = {
    "E≈0": "the fold's fit put E at its lower bound (irreducible loss not identified)",
    "α@bound": "the fold's fit put α at its bound",
    "β@bound": "the fold's fit put β at its bound",
    "boot-collapsed": "the bootstrap's parameter spread is ≈ 0: the interval is the noise term",
    "boot-failed": "the bootstrap refits failed: the interval is the noise term alone",
    "boot-partial": "more than 20% of the fold's bootstrap refits failed",
}


@dataclass(frozen=True)
class Fold:
    """One fit of a back-test: which sizes it saw, what it found, what was flagged."""

    fit_sizes: int
    """k: model sizes fitted."""
    held_out: tuple[int, ...]
    """1-based ranks (by N) of the sizes predicted."""
    n_fit: int
    c_max: float
    """Largest compute among the fitted points."""
    law: dict[str, float] | None
    warnings: tuple[str, ...]
    flags: tuple[str, ...]
    n_boot_ok: int
    noise_sd: float
    noise_source: str
    seed_sd: float
    seconds: float
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["held_out"] = list(self.held_out)
        d["warnings"] = list(self.warnings)
        d["flags"] = list(self.flags)
        return d


def _stats(t: pd.DataFrame) -> dict[str, Any]:
    if not len(t):
        return {"n": 0}
    err = t["rel_error"].abs()
    return {
        "n": int(len(t)),
        "mean_abs_rel_error": float(err.mean()),
        "max_abs_rel_error": float(err.max()),
        "coverage": float(t["inside"].mean()),
        "mean_half_width": float(((t["hi"] - t["lo"]) / (2 * t["predicted"])).mean()),
    }


@dataclass(frozen=True)
class BacktestResult:
    """Per held-out point (``table``): k, N, D, C, observed, predicted, lo, hi, rel_error,
    extrapolation, inside, param_sd, noise_sd, flags; plus the folds."""

    table: pd.DataFrame
    mode: str
    level: float = 0.9
    n_boot: int = 0
    seed: int = 0
    folds: tuple[Fold, ...] = ()
    seconds: float = 0.0
    n_sizes: int = 0
    """Model sizes in the table (N values equal within ``size_rtol``)."""

    @property
    def mean_abs_error(self) -> float:
        return float(self.table["rel_error"].abs().mean())

    @property
    def max_abs_error(self) -> float:
        return float(self.table["rel_error"].abs().max())

    @property
    def coverage(self) -> float:
        """Share of held-out points inside their interval (nominal: :attr:`level`)."""
        return float(self.table["inside"].mean()) if len(self.table) else math.nan

    def summary(self) -> dict[str, Any]:
        """All points, by extrapolation bucket and at ≥1×, ≥2×, ≥10×: n, mean and max |error|,
        coverage, mean interval half-width (relative); the folds' flags and skips."""
        t = self.table
        ext = t["extrapolation"]
        return {
            "mode": self.mode,
            "level": self.level,
            "n_sizes": self.n_sizes,
            "n_folds": sum(1 for f in self.folds if f.skipped is None),
            "all": _stats(t),
            "buckets": [
                {"range": name, **_stats(t[(ext >= lo) & (ext < hi)])} for lo, hi, name in BUCKETS
            ],
            "at_least": {f"{x:g}×": _stats(t[ext >= x]) for x in THRESHOLDS},
            "flags": [
                f"k={f.fit_sizes} (held out {_ranks(f.held_out)}): {w}"
                for f in self.folds
                for w in f.warnings
            ],
            "skipped": [
                f"k={f.fit_sizes} (held out {_ranks(f.held_out)}): {f.skipped}"
                for f in self.folds
                if f.skipped
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        pts = []
        for r in self.table.to_dict(orient="records"):
            pts.append(
                {k: (bool(v) if k == "inside" else int(v) if k == "k" else v) for k, v in r.items()}
            )
        return {
            "mode": self.mode,
            "level": self.level,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "seconds": self.seconds,
            "mean_abs_rel_error": self.mean_abs_error,
            "max_abs_rel_error": self.max_abs_error,
            "coverage": self.coverage,
            "summary": self.summary(),
            "folds": [f.to_dict() for f in self.folds],
            "points": pts,
        }


def _ranks(held: tuple[int, ...]) -> str:
    return f"size {held[0]}" if len(held) == 1 else f"sizes {held[0]}–{held[-1]}"


def _fit_flags(fit: DataModelFit) -> list[str]:
    out = []
    for w in fit.warnings:
        if w.startswith("E is"):
            out.append("E≈0")
        elif w.startswith("alpha"):
            out.append("α@bound")
        elif w.startswith("beta"):
            out.append("β@bound")
    return out


def _folds(mode: str, n_groups: int, min_fit_sizes: int, max_folds: int | None) -> list[Any]:
    """(k, held-out group labels, training group labels) per fold."""
    all_g = list(range(n_groups))
    if mode == "largest":
        return [(n_groups - 1, [n_groups - 1], all_g[:-1])]
    if mode == "each":
        return [(n_groups - 1, [g], [h for h in all_g if h != g]) for g in all_g]
    ks = list(range(min_fit_sizes, n_groups))
    if max_folds is not None and len(ks) > max_folds:
        pick = np.unique(np.round(np.linspace(ks[0], ks[-1], max(max_folds, 1))).astype(int))
        ks = [int(k) for k in pick]
    return [(k, all_g[k:], all_g[:k]) for k in ks]


def backtest(
    df: pd.DataFrame,
    *,
    target: str = "loss",
    mode: str = "largest",
    n_boot: int = DEFAULT_BOOT,
    level: float = 0.9,
    seed: int = 0,
    min_fit_sizes: int = 3,
    max_folds: int | None = None,
    noise_floor: float = NOISE_FLOOR,
    size_rtol: float = 1e-3,
    **fit_kwargs: Any,
) -> BacktestResult:
    """Back-test the data–model fit on ``df`` (columns N, D, ``target``, optionally C, seed).

    ``mode``: ``rollout``, ``largest`` or ``each`` (module docstring). ``n_boot``: bootstrap
    refits per fold (0: intervals from the noise term alone, flagged). ``level``: interval mass.
    ``max_folds`` caps the rollout's folds on long ladders (k spread evenly, the last kept).
    Sizes are N values equal within ``size_rtol`` (relative). Other keyword arguments go to the
    fit. Raises :class:`TooFewPointsError` when the table has too few sizes for the mode, and
    :class:`ScalingError` when every fold's fit failed (a failed fold is otherwise skipped and
    reported)."""
    if mode not in MODES:
        raise ScalingError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not 0.0 < level < 1.0:
        raise ScalingError(f"level must be in (0, 1), not {level}")
    for c in ("N", "D", target):
        if c not in df.columns:
            raise ScalingError(f"column {c!r} not in the table; it has {', '.join(df.columns)}")
    t_start = time.perf_counter()
    df = df.reset_index(drop=True)
    groups = _group_close(np.log(df["N"].to_numpy(dtype=float)), size_rtol)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < 3:
        raise TooFewPointsError(
            f"a back-test needs ≥3 model sizes (≥2 left to fit α); found {n_groups}"
        )
    if mode == "rollout" and n_groups <= min_fit_sizes:
        raise TooFewPointsError(
            f"a rollout back-test fits the k ≥ {min_fit_sizes} smallest sizes and predicts the "
            f"larger ones, so it needs ≥{min_fit_sizes + 1} model sizes; found {n_groups} "
            "(mode 'largest' or 'each' needs 3)"
        )
    N, D = df["N"].to_numpy(float), df["D"].to_numpy(float)
    C = df["C"].to_numpy(float) if "C" in df.columns else 6.0 * N * D
    C = np.where(np.isfinite(C), C, 6.0 * N * D)
    y = df[target].to_numpy(float)
    rows: list[dict[str, Any]] = []
    folds: list[Fold] = []
    for i, (k, held, train_g) in enumerate(_folds(mode, n_groups, min_fit_sizes, max_folds)):
        fold, fold_rows = _run_fold(
            df, groups, N, D, C, y, k, held, train_g, target, n_boot, level, seed + i,
            noise_floor, fit_kwargs,
        )  # fmt: skip
        folds.append(fold)
        rows += fold_rows
    if not rows:
        reasons = "; ".join(f"k={f.fit_sizes}: {f.skipped}" for f in folds[:3])
        raise ScalingError(f"every fold of the back-test failed to fit: {reasons}")
    table = pd.DataFrame(rows).sort_values(["k", "N", "D"], kind="stable").reset_index(drop=True)
    return BacktestResult(
        table=table,
        mode=mode,
        level=level,
        n_boot=n_boot,
        seed=seed,
        folds=tuple(folds),
        seconds=time.perf_counter() - t_start,
        n_sizes=n_groups,
    )


def _run_fold(
    df: pd.DataFrame,
    groups: np.ndarray,
    N: np.ndarray,
    D: np.ndarray,
    C: np.ndarray,
    y: np.ndarray,
    k: int,
    held: list[int],
    train_g: list[int],
    target: str,
    n_boot: int,
    level: float,
    seed: int,
    noise_floor: float,
    fit_kwargs: dict[str, Any],
) -> tuple[Fold, list[dict[str, Any]]]:
    t0 = time.perf_counter()
    train = np.isin(groups, train_g)
    test = np.isin(groups, held)
    ranks = tuple(g + 1 for g in held)
    c_max = float(np.max(C[train]))
    retried: list[str] = []
    try:
        try:
            fit = fit_data_model(df[train], target=target, **fit_kwargs)
        except ConvergenceError as e:
            if "maxiter" in fit_kwargs:
                raise
            # a long flat valley (E → 0 on a few small sizes) can need more L-BFGS-B steps
            fit = fit_data_model(df[train], target=target, maxiter=RETRY_MAXITER, **fit_kwargs)
            retried.append(f"the fit converged only with maxiter={RETRY_MAXITER} ({e})")
    except ScalingError as e:
        skipped = Fold(k, ranks, int(train.sum()), c_max, None, (), (), 0, math.nan, "", 0.0,
                       time.perf_counter() - t0, skipped=str(e))  # fmt: skip
        return skipped, []
    noise = NoiseModel.from_fit(fit, df[train], target=target, floor=noise_floor)
    warnings = list(fit.warnings) + retried
    flags = _fit_flags(fit)
    samples = None
    n_ok = 0
    if n_boot > 0:
        try:
            boot = bootstrap_points(
                N[train], D[train], y[train], n_boot=n_boot, seed=seed, fit=fit, delta=fit.delta
            )
            samples, n_ok = boot.samples, len(boot.samples)
            if boot.n_failed > 0.2 * n_boot:
                flags.append("boot-partial")
                warnings.append(f"{boot.n_failed} of {n_boot} bootstrap refits failed")
        except ScalingError as e:
            flags.append("boot-failed")
            warnings.append(f"bootstrap failed ({e}): the interval is the noise term alone")
    ivs = predictive_intervals(fit.law, samples, noise, N[test], D[test], level=level)
    if any("collapsed" in fl for iv in ivs for fl in iv.flags):
        flags.append("boot-collapsed")
        warnings.append(
            "bootstrap collapsed (parameter spread ≈ 0): intervals widened to the residual/seed "
            f"noise term (±{noise.scale:.2%} scale, from {noise.source})"
        )
    if n_boot == 0:
        warnings.append("no bootstrap (n_boot=0): parameter uncertainty left out of the intervals")
    rows = []
    held_N = {g: float(np.exp(np.mean(np.log(N[groups == g])))) for g in held}
    for j, iv in zip(np.flatnonzero(test), ivs):
        obs = float(y[j])
        rows.append(
            {
                "k": k,
                "held_N": held_N[int(groups[j])],
                "N": float(N[j]),
                "D": float(D[j]),
                "C": float(C[j]),
                "observed": obs,
                "predicted": iv.predicted,
                "lo": iv.lo,
                "hi": iv.hi,
                "rel_error": iv.predicted / obs - 1.0,
                "extrapolation": float(C[j] / c_max),
                "inside": bool(iv.contains(obs)),
                "param_sd": iv.param_sd,
                "noise_sd": iv.noise_sd,
                "flags": " ".join(dict.fromkeys(flags)),
            }
        )
    fold = Fold(
        fit_sizes=k,
        held_out=ranks,
        n_fit=int(train.sum()),
        c_max=c_max,
        law=fit.law.to_dict(),
        warnings=tuple(warnings),
        flags=tuple(dict.fromkeys(flags)),
        n_boot_ok=n_ok,
        noise_sd=noise.scale,
        noise_source=noise.source,
        seed_sd=noise.seed_sd,
        seconds=time.perf_counter() - t0,
    )
    return fold, rows
