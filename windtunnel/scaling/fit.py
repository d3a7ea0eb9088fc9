"""The data–model fit ``L = E + A/N^α + B/D^β`` (Chinchilla approach 3), robust and fast.

Objective (Hoffmann et al. 2022; Besiroglu et al. 2024): the Huber function (δ = 1e-3) of the
log-loss residuals ``log L̂ − log L`` in the log-sum-exp parametrization
``log L̂ = LSE(a − α·log N, b − β·log D, e)`` with ``A = e^a, B = e^b, E = e^e``.

Optimizer (global, then local):

1. **Variable projection on a grid of exponents.** For every ``(α, β)`` of a grid the law is
   linear in ``(E, A, B)``; those come from non-negative least squares on relative residuals,
   re-weighted a few times (IRLS) towards the Huber objective. The 3-column NNLS is solved exactly
   and vectorized over the grid by enumerating the active sets (:mod:`.varpro`: time linear in
   the number of points, memory bounded whatever their number).
2. **Polish** the best grid points (the best of each basin) with L-BFGS-B on the exact Huber
   objective with its analytic gradient, restarted until it stops improving.

The objective is divided by its value at the best start before the local search, so summing
instead of averaging (or any other positive scaling) gives the same answer to the last digit, and
the result is checked to be a stationary point away from its start: a fit that stopped where it
began, or with a large gradient, raises :class:`ConvergenceError`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from windtunnel.scaling.errors import ConvergenceError, InputError
from windtunnel.scaling.laws import FORMS, DataModelLaw, huber, lse_log_loss
from windtunnel.scaling.validate import MIN_POINTS, validate_points
from windtunnel.scaling.varpro import basin_minima, profile_grid

__all__ = ["MIN_POINTS", "DataModelFit", "fit_data_model", "fit_points", "validate_points"]

DEFAULT_GRID = (np.linspace(0.02, 1.5, 38), np.linspace(0.02, 1.5, 38))
FAST_GRID = (np.linspace(0.02, 1.5, 14), np.linspace(0.02, 1.5, 14))

LAZY_MARGIN = 0.05
"""Grid starts worse than the best polished value by more than this share are skipped (lazy)."""


@dataclass(frozen=True)
class DataModelFit:
    """Result of :func:`fit_points` / :func:`fit_data_model`."""

    law: DataModelLaw
    """Fitted coefficients, raw units (N params, D tokens)."""
    form: str
    """``chinchilla`` or ``minicpm`` (same law; minicpm also reports C_N, C_D, L0 in billions)."""
    target: str
    """Column that was fitted (``loss``, ``bpb``, …)."""
    n_points: int
    delta: float
    """Huber threshold on log residuals."""
    objective: float
    """Mean Huber loss per point at the optimum (independent of ``reduction``)."""
    rms_log_residual: float
    """Root-mean-square of ``log L̂ − log L`` (≈ RMS relative error)."""
    max_abs_log_residual: float
    grad_norm: float
    """Max-norm of the gradient of the normalized objective at the optimum (free coordinates)."""
    n_starts: int
    """Grid points of the exponent search plus user starts."""
    n_polished: int
    """Local searches run from the best starts."""
    n_reached_best: int
    """Local searches that ended within 1e-6 (relative) of the best objective."""
    seconds: float
    warnings: tuple[str, ...] = ()
    residuals: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    """Per-point ``log L̂ − log L`` in input order."""

    @property
    def E(self) -> float:
        return self.law.E

    @property
    def A(self) -> float:
        return self.law.A

    @property
    def B(self) -> float:
        return self.law.B

    @property
    def alpha(self) -> float:
        return self.law.alpha

    @property
    def beta(self) -> float:
        return self.law.beta

    def predict(self, N: Any, D: Any) -> np.ndarray:
        return self.law.predict(N, D)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (parameters, MiniCPM coefficients, diagnostics)."""
        out: dict[str, Any] = {
            "form": self.form,
            "target": self.target,
            **self.law.to_dict(),
            "n_points": self.n_points,
            "delta": self.delta,
            "objective": self.objective,
            "rms_log_residual": self.rms_log_residual,
            "max_abs_log_residual": self.max_abs_log_residual,
            "grad_norm": self.grad_norm,
            "n_starts": self.n_starts,
            "n_polished": self.n_polished,
            "n_reached_best": self.n_reached_best,
            "seconds": self.seconds,
            "warnings": list(self.warnings),
        }
        if self.form == "minicpm":
            out["minicpm"] = self.law.minicpm_coefficients()
        return out


# ----------------------------------------------------------------------------- objective


class _Problem:
    """Huber objective on log residuals, with per-point weights (bootstrap counts).

    N and D are centred on their geometric means (``n0``, ``d0``): the optimizer's θ holds
    ``a' = log A − α·n0`` (and ``b'``), which decouples the scale from the exponent (without it
    a change of α moves A/N^α by N^Δα, a long narrow valley where L-BFGS-B stalls).
    :meth:`centred` and :meth:`uncentred` convert θ."""

    def __init__(self, N: np.ndarray, D: np.ndarray, loss: Any, weights: Any, delta: float) -> None:
        self.n0 = float(np.mean(np.log(N)))
        self.d0 = float(np.mean(np.log(D)))
        self.logN = np.log(N) - self.n0
        self.logD = np.log(D) - self.d0
        self.L = np.asarray(loss, dtype=float)
        self.logL = np.log(self.L)
        self.w = np.ones_like(self.L) if weights is None else np.asarray(weights, dtype=float)
        self.delta = delta

    def centred(self, theta: np.ndarray) -> np.ndarray:
        a, b, e, alpha, beta = theta
        return np.array([a - alpha * self.n0, b - beta * self.d0, e, alpha, beta])

    def uncentred(self, theta: np.ndarray) -> np.ndarray:
        a, b, e, alpha, beta = theta
        return np.array([a + alpha * self.n0, b + beta * self.d0, e, alpha, beta])

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        r: np.ndarray = lse_log_loss(theta, self.logN, self.logD) - self.logL
        return r

    def value(self, theta: np.ndarray) -> float:
        return float(np.dot(self.w, huber(self.residuals(theta), self.delta)))

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, e, alpha, beta = theta
        z1 = a - alpha * self.logN
        z2 = b - beta * self.logD
        m = np.maximum(np.maximum(z1, z2), e)
        e1, e2, e3 = np.exp(z1 - m), np.exp(z2 - m), np.exp(e - m)
        s = e1 + e2 + e3
        r = m + np.log(s) - self.logL
        ar = np.abs(r)
        d = self.delta
        f = float(np.dot(self.w, np.where(ar <= d, 0.5 * r * r, d * (ar - 0.5 * d))))
        g = self.w * np.clip(r, -d, d) / s
        g1, g2 = g * e1, g * e2
        grad = np.array([g1.sum(), g2.sum(), (g * e3).sum(), -(g1 @ self.logN), -(g2 @ self.logD)])
        return f, grad


def _theta(E: float, A: float, B: float, alpha: float, beta: float, floor: float) -> np.ndarray:
    return np.array(
        [math.log(max(A, floor)), math.log(max(B, floor)), math.log(max(E, floor)), alpha, beta]
    )


def _bounds(prob: _Problem) -> list[tuple[float, float]]:
    top = float(np.log(prob.L.max())) + 1.0
    return [(-60.0, 400.0), (-60.0, 400.0), (-40.0, top), (1e-4, 5.0), (1e-4, 5.0)]


_SINGLE_THREADED = False


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread: L-BFGS-B's tiny matrix work slows down 10× on a busy machine
    when BLAS spins several threads (measured on 2 cores). No-op without ``threadpoolctl``."""
    global _SINGLE_THREADED
    if _SINGLE_THREADED:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        _SINGLE_THREADED = True
        try:
            yield
        finally:
            _SINGLE_THREADED = False


def _polish(
    prob: _Problem,
    theta0: np.ndarray,
    scale: float,
    maxiter: int,
    bounds: list[tuple[float, float]],
) -> tuple[np.ndarray, float, int, Any]:
    """L-BFGS-B on the normalized objective, restarted while it keeps improving."""
    from scipy.optimize import minimize

    def fg(t: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = prob.value_and_grad(t)
        return f / scale, g / scale

    x = np.asarray(theta0, dtype=float)
    fx = fg(x)[0]
    used = 0
    res = None
    for _ in range(6):
        res = minimize(
            fg,
            x,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": max(maxiter - used, 1), "ftol": 1e-15, "gtol": 1e-10},
        )
        used += int(res.nit)
        improved = fx - res.fun > 1e-12 * max(abs(fx), 1.0)
        if res.fun <= fx:
            x, fx = res.x, float(res.fun)
        # a clean stop is final; a line-search failure at a Huber kink gets a fresh start
        if res.success or not improved or used >= maxiter:
            break
    return x, fx, used, res


def _projected_grad(
    prob: _Problem, theta: np.ndarray, scale: float, bounds: list[tuple[float, float]]
) -> float:
    g = prob.value_and_grad(theta)[1] / scale
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    free = ~(((theta <= lo + 1e-9) & (g > 0)) | ((theta >= hi - 1e-9) & (g < 0)))
    return float(np.max(np.abs(g[free]))) if free.any() else 0.0


def fit_points(
    N: Any,
    D: Any,
    loss: Any,
    *,
    delta: float = 1e-3,
    reduction: str = "mean",
    weights: Any = None,
    grid: tuple[np.ndarray, np.ndarray] | str = "default",
    n_polish: int = 4,
    x0: list[DataModelLaw] | None = None,
    maxiter: int = 2000,
    form: str = "chinchilla",
    target: str = "loss",
    check: bool = True,
    lazy: bool = False,
    cells: np.ndarray | None = None,
) -> DataModelFit:
    """Fit ``L = E + A/N^α + B/D^β`` to arrays of N, D and loss.

    ``reduction`` (``mean`` or ``sum``) only names the objective's scale: the answer is identical.
    ``weights`` are per-point multiplicities (the bootstrap passes resampling counts).
    ``grid`` is ``default`` (38×38 exponents in [0.02, 1.5]), ``fast`` (14×14) or explicit
    ``(alphas, betas)``. ``x0`` adds starting laws (polished as well). ``maxiter`` caps the
    L-BFGS-B iterations of each local search; a search that runs out of iterations with a
    non-zero gradient raises :class:`ConvergenceError`. ``lazy`` (used by the bootstrap, with
    the full-data optimum in ``x0``) polishes the user starts first and skips grid starts that
    lie within 1.5 grid steps of the best optimum found (same basin) or whose
    variable-projection objective is more than ``LAZY_MARGIN`` above it. ``cells`` (a boolean
    ``(len(alphas), len(betas))`` mask, e.g. from :func:`candidate_cells`) restricts the grid
    search to those exponents.
    """
    t_start = time.perf_counter()
    if form not in FORMS:
        raise InputError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    N = np.asarray(N, dtype=float).ravel()
    D = np.asarray(D, dtype=float).ravel()
    loss = np.asarray(loss, dtype=float).ravel()
    if check:
        validate_points(N, D, loss, target=target)
    prob = _Problem(N, D, loss, weights, delta)
    if reduction == "mean":
        prob.w = prob.w / prob.w.sum()
    alphas, betas = _grid(grid)
    if cells is not None and (np.shape(cells) != (len(alphas), len(betas)) or not np.any(cells)):
        raise InputError(
            f"cells must be a boolean {len(alphas)}×{len(betas)} mask of the grid with at least "
            f"one cell, not shape {np.shape(cells)} with {int(np.sum(cells))} set"
        )
    floor = 1e-12 * float(loss.min())

    with single_threaded_blas():  # many small products: threads only add overhead
        f_grid, al, be, coef = profile_grid(
            prob.logN, prob.logD, prob.L, prob.w, delta, alphas, betas, cells=cells
        )
    picks = basin_minima(f_grid, (len(alphas), len(betas)), n_polish)
    picks = [i for i in picks if np.isfinite(f_grid[i])] or picks[:1]
    starts = [_theta(coef[i, 0], coef[i, 1], coef[i, 2], al[i], be[i], floor) for i in picks]
    for law in x0 or []:
        starts.append(prob.centred(_theta(law.E, law.A, law.B, law.alpha, law.beta, floor)))
    values0 = [prob.value(t) for t in starts]
    scale = min(values0)
    if not scale > 0:
        scale = 1.0  # an exact fit: any positive scale works
    bounds = _bounds(prob)
    da = float(np.max(np.diff(alphas))) if len(alphas) > 1 else 0.1
    db = float(np.max(np.diff(betas))) if len(betas) > 1 else 0.1

    results: list[tuple[float, np.ndarray, int, Any, np.ndarray]] = []
    order = list(range(len(starts)))
    if lazy and x0:  # user starts first; grid starts only where they could beat them
        order = list(range(len(picks), len(starts))) + list(range(len(picks)))
    with single_threaded_blas():
        for i in order:
            t0 = starts[i]
            if lazy and results and i < len(picks):
                fb, xb = min(results, key=lambda r: r[0])[:2]
                near = all(
                    abs(t0[j] - xb[j]) <= 1.5 * step for j, step in ((3, da), (4, db))
                )  # the best polished point lies in this grid cell's basin already
                if near or values0[i] / scale > fb * (1.0 + LAZY_MARGIN):
                    continue
            x, fx, nit, res = _polish(prob, t0, scale, maxiter, bounds)
            results.append((fx, x, nit, res, t0))
    results.sort(key=lambda r: r[0])
    fbest, xbest, nit, res, t0 = results[0]
    gnorm = _projected_grad(prob, xbest, scale, bounds)
    n_best = sum(1 for r in results if r[0] <= fbest * (1 + 1e-6) + 1e-15)

    moved = float(np.max(np.abs(xbest - t0)))
    if gnorm > 1e-3 or (nit >= maxiter and gnorm > 1e-5):
        raise ConvergenceError(
            f"the fit did not converge: gradient {gnorm:.2e} (normalized) after {nit} "
            f"iterations ({getattr(res, 'message', '')}); raise maxiter (now {maxiter}) or "
            "remove outlying points"
        )
    if moved == 0.0 and gnorm > 1e-8:
        raise ConvergenceError(
            "the optimizer stopped at its starting point with a non-zero gradient; check the "
            "points for outliers or duplicates"
        )

    law = DataModelLaw.from_log_params(prob.uncentred(xbest))
    r = prob.residuals(xbest)
    w_pts = np.ones_like(r) if weights is None else np.asarray(weights, dtype=float)
    mean_obj = float(np.dot(w_pts, huber(r, delta)) / w_pts.sum())
    warnings = []
    lo_hi = _bounds(prob)
    if xbest[2] <= lo_hi[2][0] + 1e-6 or 1e-3 * loss.min() > law.E:
        warnings.append("E is at its lower bound (≈0): the irreducible loss is not identified")
    for i, name in ((3, "alpha"), (4, "beta")):
        if xbest[i] <= lo_hi[i][0] + 1e-6 or xbest[i] >= lo_hi[i][1] - 1e-6:
            warnings.append(f"{name} is at its bound ({xbest[i]:.4g}): not identified by the data")
    return DataModelFit(
        law=law,
        form=form,
        target=target,
        n_points=len(loss),
        delta=delta,
        objective=mean_obj,
        rms_log_residual=float(np.sqrt(np.mean(r * r))),
        max_abs_log_residual=float(np.max(np.abs(r))),
        grad_norm=gnorm,
        n_starts=(len(f_grid) if cells is None else int(np.isfinite(f_grid).sum())) + len(x0 or []),
        n_polished=len(results),
        n_reached_best=n_best,
        seconds=time.perf_counter() - t_start,
        warnings=tuple(warnings),
        residuals=r,
    )


def _grid(grid: tuple[np.ndarray, np.ndarray] | str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(grid, str):
        if grid not in ("default", "fast"):
            raise InputError(f"grid must be 'default', 'fast' or (alphas, betas), not {grid!r}")
        grid = DEFAULT_GRID if grid == "default" else FAST_GRID
    alphas, betas = (np.asarray(g, dtype=float) for g in grid)
    return alphas, betas


def candidate_cells(
    N: Any,
    D: Any,
    loss: Any,
    *,
    margin: float,
    grid: tuple[np.ndarray, np.ndarray] | str = "fast",
    delta: float = 1e-3,
) -> np.ndarray:
    """Cells of the exponent grid whose variable-projection objective on these points is within
    ``margin`` (relative) of the grid's best, as a boolean ``(len(alphas), len(betas))`` mask.

    The bootstrap computes it once on the full data and refits search only those cells: a cell
    far worse than the best on the full data does not become the best of a resample (see
    :data:`windtunnel.scaling.bootstrap.REFIT_MARGIN`)."""
    alphas, betas = _grid(grid)
    N, D, loss = (np.asarray(x, dtype=float).ravel() for x in (N, D, loss))
    prob = _Problem(N, D, loss, None, delta)
    with single_threaded_blas():
        f = profile_grid(prob.logN, prob.logD, prob.L, prob.w / len(loss), delta, alphas, betas)[0]
    keep: np.ndarray = f <= (1.0 + margin) * np.nanmin(f)
    if not keep.any():  # no finite value: search everywhere
        keep[:] = True
    return keep.reshape(len(alphas), len(betas))


def fit_data_model(
    df: Any,
    *,
    target: str = "loss",
    n_col: str = "N",
    d_col: str = "D",
    form: str = "chinchilla",
    **kwargs: Any,
) -> DataModelFit:
    """Fit the data–model law to a run table (one row per finished point).

    ``target`` is the loss column (``loss``, ``bpb``, ``bpb/<domain>`` …); ``n_col`` and ``d_col``
    name the parameter and token columns. Other keyword arguments go to :func:`fit_points`.
    """
    missing = [c for c in (n_col, d_col, target) if c not in df.columns]
    if missing:
        raise InputError(
            f"column(s) {', '.join(map(repr, missing))} not in the table; it has: "
            f"{', '.join(map(str, df.columns))}"
        )
    return fit_points(
        df[n_col].to_numpy(dtype=float),
        df[d_col].to_numpy(dtype=float),
        df[target].to_numpy(dtype=float),
        form=form,
        target=target,
        **kwargs,
    )
