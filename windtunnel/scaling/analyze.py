"""One call from a run table to everything the wind tunnel reports, and the fit file.

:func:`analyze` fits the data–model law, bootstraps it, derives the allocation at the requested
budgets, and runs the diagnostics the table supports (IsoFLOP profiles, the μTransfer check).
The result is a JSON-ready dict — the *fit file* the planner reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from windtunnel.scaling.allocation import compute_optimal, minicpm_closed_form
from windtunnel.scaling.bootstrap import bootstrap_points
from windtunnel.scaling.errors import ScalingError
from windtunnel.scaling.fit import DataModelFit, fit_data_model
from windtunnel.scaling.intervals import NOISE_FLOOR
from windtunnel.schema import FileModel, written

FIT_FILE_KIND = "windtunnel.scaling.fit"
FIT_FILE_VERSION = 2
"""2: ``data_range`` records the fitted N, D, compute, tokens per parameter and target ranges,
and a batch-size law its ``loss_range`` (what the planner's checks read); 1 had N, D, C only."""

# -- the fit file's schema: what the planner reads (other fields are kept, not checked) ----------

Range = Annotated[list[float], Field(min_length=2, max_length=2)]


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class FitLaw(FileModel):
    """The law L = E + A/N^α + B/D^β: finite, E ≥ 0, every other parameter > 0 (a law with a
    zero or negative exponent has no size or data term: no allocation, no plan)."""

    E: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    A: Positive
    B: Positive
    alpha: Positive
    beta: Positive
    form: str = "chinchilla"
    target: str = "loss"
    warnings: list[str] = Field(default_factory=list)


class FitBootstrap(FileModel):
    seed: int
    n_boot: int
    n_failed: int
    level: float
    budgets: list[float] = Field(default_factory=list)
    seconds: float = 0.0
    samples: list[Annotated[list[float | None], Field(min_length=5, max_length=5)]]


class FitNoise(FileModel):
    residuals: list[float | None] = Field(default_factory=list)
    seed_sd: float = 0.0
    seed_dof: int = 0
    floor: float = NOISE_FLOOR


class FitBatchLaw(FileModel):
    k: float
    gamma: float
    loss_range: Range | None = None


class FitDataRange(FileModel):
    N: Range
    D: Range
    C: Range
    tokens_per_param: Range


class FitFileV1(FileModel):
    """Version 1: no ``data_range`` (the planner takes it from ``points.csv`` when it can)."""

    kind: Literal["windtunnel.scaling.fit"]
    version: int = 1
    source: str = ""
    fit: FitLaw
    bootstrap: FitBootstrap | None = None
    diagnostics: dict[str, Any] = Field(default_factory=dict)
    noise: FitNoise | None = None
    batch_size_law: FitBatchLaw | None = None
    data_range: dict[str, Range] | None = None
    lr: float | None = None


class FitFileV2(FitFileV1):
    """Version 2: the fitted ranges, required."""

    data_range: FitDataRange  # type: ignore[assignment]


FIT_FILE_MODELS: dict[int, type[FitFileV1]] = {1: FitFileV1, 2: FitFileV2}
"""Each fit-file version this windtunnel reads, and its model."""


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def analyze(
    df: pd.DataFrame,
    *,
    target: str = "loss",
    form: str = "chinchilla",
    budgets: tuple[float, ...] = (1e21,),
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    delta: float = 1e-3,
    reduction: str = "mean",
    source: str = "",
    backtest_mode: str = "largest",
    backtest_boot: int | None = None,
    backtest_level: float = 0.9,
    backtest_max_folds: int | None = None,
    maxiter: int = 2000,
) -> tuple[dict[str, Any], DataModelFit, Any, dict[str, Any]]:
    """Fit + bootstrap + allocation + diagnostics → (fit-file dict, fit, bootstrap, extras).

    The back-test (``backtest_mode``: ``largest``, ``rollout`` or ``each``; ``backtest_boot``
    refits per fold, default :data:`~windtunnel.scaling.backtest.DEFAULT_BOOT`) goes into the
    diagnostics and, as a :class:`~windtunnel.scaling.backtest.BacktestResult`, into
    ``extras["backtest"]``. The fit file's ``noise`` section (the fit's residuals and the seed
    noise of repeated points) is what :func:`windtunnel.scaling.intervals.fit_file_interval`
    needs for a prediction interval of one new run. ``maxiter`` caps the iterations of each
    local search of the fit (not of the bootstrap's)."""
    from windtunnel.scaling.backtest import DEFAULT_BOOT, backtest
    from windtunnel.scaling.intervals import NoiseModel

    fit = fit_data_model(
        df, target=target, form=form, delta=delta, reduction=reduction, maxiter=maxiter
    )
    boot = None
    if n_boot > 0:
        boot = bootstrap_points(
            df["N"].to_numpy(float),
            df["D"].to_numpy(float),
            df[target].to_numpy(float),
            n_boot=n_boot,
            seed=seed,
            level=level,
            budgets=budgets,
            fit=fit,
            delta=delta,
        )
    a = compute_optimal(fit.law, budgets[0] if budgets else 1e21)
    allocation = {f"{C:.3g}": compute_optimal(fit.law, C).to_dict() for C in budgets}
    extras: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    if "C" in df.columns:
        from windtunnel.scaling.isoflop import isoflop_profiles

        try:
            iso = isoflop_profiles(df, target=target)
            centred = int(iso.profiles["centred"].sum())
            if centred < 2:  # parabolas extrapolated to their minima: no finding
                raise ScalingError(
                    f"not an IsoFLOP design: {centred} of {len(iso.profiles)} budgets have their "
                    "minimum inside the sampled sizes (centred); need ≥2"
                )
            extras["isoflop"] = iso
            diagnostics["isoflop"] = iso.to_dict()
        except ScalingError as e:
            diagnostics["isoflop"] = {"skipped": str(e)}
    try:
        bt = backtest(
            df,
            target=target,
            mode=backtest_mode,
            n_boot=DEFAULT_BOOT if backtest_boot is None else backtest_boot,
            level=backtest_level,
            seed=seed,
            max_folds=backtest_max_folds,
            delta=delta,
        )
        extras["backtest"] = bt
        diagnostics["backtest"] = bt.to_dict()
    except ScalingError as e:
        diagnostics["backtest"] = {"skipped": str(e)}
    if {"width", "lr"} <= set(df.columns) and df["width"].nunique() > 1 and df["lr"].nunique() > 2:
        from windtunnel.scaling.batch_lr import mutransfer_check
        from windtunnel.scaling.mutransfer import transfer_verdict

        try:
            extras["mutransfer"] = mutransfer_check(df, target=target)
            # one token count per (width, lr): the longest run's points (seed repeats kept), so
            # that losses at other D are not mistaken for seed noise
            last = df[df["D"] == df.groupby(["width", "lr"])["D"].transform("max")]
            extras["mutransfer_verdict"] = transfer_verdict(last, target=target)
            diagnostics["mutransfer"] = {
                **extras["mutransfer"].to_dict(),
                "verdict": extras["mutransfer_verdict"].verdict,
                "why": extras["mutransfer_verdict"].why,
            }
        except ScalingError as e:
            diagnostics["mutransfer"] = {"skipped": str(e)}
    summary = {
        **fit.to_dict(),
        "a": a.a,
        "b": a.b,
        "intervals": boot.intervals() if boot is not None else {},
        "allocation": allocation,
        "minicpm_closed_form": {f"{C:.3g}": minicpm_closed_form(fit.law, C) for C in budgets},
    }
    fit_file = {
        "kind": FIT_FILE_KIND,
        "version": FIT_FILE_VERSION,
        "source": source,
        "fit": summary,
        "bootstrap": boot.to_dict() if boot is not None else None,
        "diagnostics": diagnostics,
        "noise": NoiseModel.from_fit(fit, df, target=target).to_dict(),
        "batch_size_law": None,
        "data_range": data_range(df, target=target),
        "lr": float(df["lr"].median()) if "lr" in df.columns and df["lr"].notna().any() else None,
    }
    return _jsonable(fit_file), fit, boot, extras


def data_range(df: pd.DataFrame, *, target: str | None = None) -> dict[str, list[float]]:
    """The span of the fitted points as [min, max]: N, D, compute 6ND, tokens per parameter and
    (given ``target``) the fitted target. How far a plan extrapolates is measured against it."""
    n, d = df["N"].to_numpy(float), df["D"].to_numpy(float)
    cols = {"N": n, "D": d, "C": 6.0 * n * d, "tokens_per_param": d / n}
    if target is not None and target in df.columns:
        cols[target] = df[target].to_numpy(float)
    return {k: [float(v.min()), float(v.max())] for k, v in cols.items()}


def json_summary(fit_file: dict[str, Any]) -> dict[str, Any]:
    """The one-object ``--json`` output: parameters, a, b, intervals, n, diagnostics."""
    f = fit_file["fit"]
    keep = (
        "form", "target", "E", "A", "B", "alpha", "beta", "a", "b", "intervals", "n_points",
        "objective", "rms_log_residual", "max_abs_log_residual", "grad_norm", "n_starts",
        "n_polished", "n_reached_best", "seconds", "warnings", "allocation", "minicpm",
    )  # fmt: skip
    out = {k: f[k] for k in keep if k in f}
    if fit_file.get("data_range"):
        out["data_range"] = fit_file["data_range"]
    boot = fit_file.get("bootstrap") or {}
    out["bootstrap"] = {k: boot.get(k) for k in ("seed", "n_boot", "n_failed", "level")}
    out["diagnostics"] = {
        k: {kk: vv for kk, vv in v.items() if kk not in ("profiles", "table", "points", "folds")}
        for k, v in fit_file.get("diagnostics", {}).items()
    }
    return out


def write_outputs(
    fit_file: dict[str, Any], df: pd.DataFrame, fit: DataModelFit, boot: Any, extras: dict[str, Any],
    out: Path, *, target: str,
) -> list[Path]:  # fmt: skip
    """Write ``fit.json``, the run table and the plots into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from windtunnel.scaling import plots

    paths = [out / "fit.json", out / "points.csv"]
    paths[0].write_text(json.dumps(written(FIT_FILE_MODELS[FIT_FILE_VERSION], fit_file), indent=1))
    df.to_csv(paths[1], index=False)
    if "C" in df.columns:
        paths.append(plots.loss_vs_compute(df, fit, out, target=target))
        paths.append(plots.fitted_vs_observed(df, fit, out, target=target))
    if "isoflop" in extras:
        paths.append(plots.isoflop_curves(df, extras["isoflop"], out, target=target))
    if "mutransfer" in extras:
        paths.append(
            plots.lr_sweeps(
                df, extras["mutransfer"], out, target=target,
                verdict=extras.get("mutransfer_verdict"),
            )
        )  # fmt: skip
    if "backtest" in extras:
        paths.append(out / "backtest.csv")
        extras["backtest"].table.to_csv(paths[-1], index=False)
        paths.append(plots.backtest_intervals(extras["backtest"], out, target=target))
    if boot is not None:
        budgets = fit_file["bootstrap"].get("budgets") or [1e21]
        paths.append(plots.bootstrap_distributions(boot, out, budget=budgets[0]))
    return paths
