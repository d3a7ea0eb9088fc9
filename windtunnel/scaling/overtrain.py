"""Gadre et al. (2024) over-training law and its held-out extrapolation error.

``L(N, M) = E + a·N^η + b·6^(η/2)·(M·N)^η`` with ``M = D/N`` (tokens per parameter), fitted by
least squares (``scipy.optimize.curve_fit``) from the authors' grid of starts, keeping the best
residual — their procedure, so that their published held-out errors can be checked.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from windtunnel.scaling.errors import ConvergenceError, TooFewPointsError
from windtunnel.scaling.laws import gadre_overtraining

P0_GRID = ([1e2, 3e2, 1e3, 3e3], [1e2, 3e2, 1e3, 3e3], [-1e-1, -3e-1], [0.0, 1.0, 2.0, 10.0])
"""(a, b, η, E) starts of the authors' ``curve_fit_powlaw_ours``."""


@dataclass(frozen=True)
class OvertrainingFit:
    a: float
    b: float
    eta: float
    E: float
    residual: float
    """``sqrt(Σ r² / (n − 2))`` as in the authors' code."""

    def predict(self, N: Any, M: Any) -> np.ndarray:
        return gadre_overtraining(N, M, self.a, self.b, self.eta, self.E)

    def relative_error(self, N: float, M: float, loss: float) -> float:
        """``|L̂ − L| / L`` at a held-out point."""
        return float(abs(self.predict(N, M) - loss) / loss)


def fit_overtraining(N: Any, M: Any, loss: Any) -> OvertrainingFit:
    """Fit the over-training law on arrays of N (params), M (tokens per param) and loss."""
    from scipy.optimize import curve_fit

    N = np.asarray(N, dtype=float)
    M = np.asarray(M, dtype=float)
    y = np.asarray(loss, dtype=float)
    if len(y) < 4:
        raise TooFewPointsError("the over-training law has 4 parameters: give at least 4 points")

    X = np.vstack([N, M])  # curve_fit's xdata: row 0 is N, row 1 is M

    def f(x: np.ndarray, a: float, b: float, eta: float, E: float) -> np.ndarray:
        return gadre_overtraining(x[0], x[1], a, b, eta, E)

    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p0 in itertools.product(*P0_GRID):
            try:
                p, _ = curve_fit(f, X, y, p0=list(p0), maxfev=10000)
            except (RuntimeError, ValueError):
                continue
            r = y - f(X, *p)
            res = float(np.sqrt(np.sum(r**2) / max(r.size - 2, 1)))
            if np.isfinite(res) and (best is None or res < best[0]):
                best = (res, p)
    if best is None:
        raise ConvergenceError("no start of the over-training fit converged")
    a, b, eta, E = (float(v) for v in best[1])
    return OvertrainingFit(a=a, b=b, eta=eta, E=E, residual=best[0])
