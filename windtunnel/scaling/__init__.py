"""Scaling laws for the wind tunnel: run tables, fits, allocation, intervals and the planner.

Pure functions on pandas tables (DESIGN §4). Heavy dependencies (scipy, matplotlib, mlflow) are
imported inside the functions that need them so ``import windtunnel.scaling`` stays cheap.

Main entry points::

    from windtunnel.scaling import fit_data_model, compute_optimal, bootstrap_fit
    fit = fit_data_model(df, target="bpb")           # L = E + A/N^α + B/D^β (Huber, LSE, VarPro)
    alloc = compute_optimal(fit.law, 1e21)            # N_opt, D_opt, tokens per parameter
    boot = bootstrap_fit(df, n_boot=1000, seed=0)     # intervals for every quantity
"""

from __future__ import annotations

from typing import Any

# name → module; resolved on first access so `windtunnel --help` does not import numpy
_EXPORTS = {
    "Allocation": "allocation",
    "allocation_exponents": "allocation",
    "compute_optimal": "allocation",
    "minicpm_closed_form": "allocation",
    "optimal_for_params": "allocation",
    "optimal_for_tokens": "allocation",
    "ConvergenceError": "errors",
    "InputError": "errors",
    "NonFiniteError": "errors",
    "NonPositiveError": "errors",
    "NotIdentifiableError": "errors",
    "ScalingError": "errors",
    "TooFewPointsError": "errors",
    "DataModelFit": "fit",
    "fit_data_model": "fit",
    "fit_points": "fit",
    "DataModelLaw": "laws",
    "PowerLaw": "laws",
    "BootstrapResult": "bootstrap",
    "bootstrap_fit": "bootstrap",
    "bootstrap_points": "bootstrap",
    "load_table": "table",
    "backtest": "backtest",
    "BacktestResult": "backtest",
    "NoiseModel": "intervals",
    "PredictionInterval": "intervals",
    "prediction_interval": "intervals",
    "fit_file_interval": "intervals",
    "analyze": "analyze",
    "make_plan": "plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'windtunnel.scaling' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"windtunnel.scaling.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
