"""Sweeps: specs (``sweeps/*.yaml``), the Optuna ask/tell driver, the Ray Tune engine."""

from windtunnel.sweep.driver import Driver, run_sweep
from windtunnel.sweep.parent import SweepSummary
from windtunnel.sweep.spec import SweepConfig, SweepSpec, load_sweep

__all__ = ["Driver", "SweepConfig", "SweepSpec", "SweepSummary", "load_sweep", "run_sweep"]
