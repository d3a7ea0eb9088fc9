"""Bootstrap confidence intervals for the data–model fit and everything derived from it.

Each replicate resamples the points with replacement (as multinomial counts, passed to the fit
as weights), refits from the full-data optimum plus a coarse exponent grid, and recomputes the
derived quantities: allocation exponents a, b and, at each requested budget, N_opt, D_opt, D/N and
the predicted loss. The seed is recorded with the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from windtunnel.scaling.allocation import FLOPS_PER_PARAM_TOKEN
from windtunnel.scaling.errors import ScalingError
from windtunnel.scaling.fit import DataModelFit, fit_points, single_threaded_blas
from windtunnel.scaling.laws import DataModelLaw

PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class BootstrapResult:
    """Replicates of the law's parameters (one row per successful refit) and their intervals."""

    samples: np.ndarray
    """(n_ok, 5) array of E, A, B, alpha, beta."""
    seed: int
    n_boot: int
    n_failed: int
    level: float
    """Central interval mass, e.g. 0.95."""
    budgets: tuple[float, ...] = ()
    seconds: float = 0.0
    failures: tuple[str, ...] = field(default=(), repr=False)

    def laws(self) -> list[DataModelLaw]:
        return [DataModelLaw(*map(float, row)) for row in self.samples]

    def derived(self, C: float, k: float = FLOPS_PER_PARAM_TOKEN) -> dict[str, np.ndarray]:
        """Per-replicate N_opt, D_opt, D/N and loss at budget ``C`` (vectorized)."""
        E, A, B, al, be = self.samples.T
        s = al + be
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            # in logs: a replicate with huge A, B and large exponents overflows otherwise
            log_n = (np.log(al * A) - np.log(be * B)) / s + (be / s) * np.log(C / k)
            log_d = np.log(C / k) - log_n
            N, D = np.exp(log_n), np.exp(log_d)
            loss = E + np.exp(np.log(A) - al * log_n) + np.exp(np.log(B) - be * log_d)
        return {"N_opt": N, "D_opt": D, "tokens_per_param": np.exp(log_d - log_n), "loss": loss}

    def predict(self, N: float, D: float) -> np.ndarray:
        """Per-replicate predicted loss at (N, D)."""
        E, A, B, al, be = self.samples.T
        loss: np.ndarray = E + A * N ** (-al) + B * D ** (-be)
        return loss

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        """Central interval of ``level``; replicates that are not finite (a law that overflows
        at this point) count as beyond either end, so too many of them widen it to infinity."""
        q = (1.0 - self.level) / 2.0
        v = np.where(np.isnan(values), np.inf, values)
        lo, hi = np.quantile(v, [q, 1.0 - q])
        return float(lo), float(hi)

    def intervals(self) -> dict[str, Any]:
        """Intervals of every parameter, a, b and, per budget, N_opt, D_opt, D/N and loss."""
        out: dict[str, Any] = {}
        for i, name in enumerate(PARAMS):
            out[name] = self.interval(self.samples[:, i])
        al, be = self.samples[:, 3], self.samples[:, 4]
        out["a"] = self.interval(be / (al + be))
        out["b"] = self.interval(al / (al + be))
        for C in self.budgets:
            out[f"C={C:.3g}"] = {k: self.interval(v) for k, v in self.derived(C).items()}
        return out

    def to_dict(self, *, include_samples: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "seed": self.seed,
            "n_boot": self.n_boot,
            "n_failed": self.n_failed,
            "level": self.level,
            "budgets": list(self.budgets),
            "seconds": self.seconds,
            "intervals": self.intervals(),
        }
        if include_samples:
            d["params"] = list(PARAMS)
            d["samples"] = self.samples.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BootstrapResult:
        return cls(
            samples=np.asarray(d["samples"], dtype=float).reshape(-1, 5),
            seed=int(d["seed"]),
            n_boot=int(d["n_boot"]),
            n_failed=int(d["n_failed"]),
            level=float(d["level"]),
            budgets=tuple(d.get("budgets", ())),
            seconds=float(d.get("seconds", 0.0)),
        )


def bootstrap_points(
    N: Any,
    D: Any,
    loss: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    budgets: tuple[float, ...] = (),
    fit: DataModelFit | None = None,
    delta: float = 1e-3,
    grid: Any = "fast",
    lazy: bool = True,
) -> BootstrapResult:
    """Bootstrap the data–model fit on arrays; ``fit`` is the full-data fit (computed if absent)."""
    t0 = time.perf_counter()
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if fit is None:
        fit = fit_points(N, D, loss, delta=delta)
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, float, float, float, float]] = []
    failures: list[str] = []
    with single_threaded_blas():
        _replicates(N, D, loss, fit, rng, n_boot, delta, grid, rows, failures, lazy)
    if not rows:
        raise ScalingError(f"all {n_boot} bootstrap refits failed; first error: {failures[0]}")
    return BootstrapResult(
        samples=np.array(rows),
        seed=seed,
        n_boot=n_boot,
        n_failed=len(failures),
        level=level,
        budgets=tuple(float(c) for c in budgets),
        seconds=time.perf_counter() - t0,
        failures=tuple(failures[:10]),
    )


def _replicates(
    N: np.ndarray,
    D: np.ndarray,
    loss: np.ndarray,
    fit: DataModelFit,
    rng: np.random.Generator,
    n_boot: int,
    delta: float,
    grid: Any,
    rows: list[tuple[float, float, float, float, float]],
    failures: list[str],
    lazy: bool,
) -> None:
    n = len(loss)
    for _ in range(n_boot):
        counts = rng.multinomial(n, np.full(n, 1.0 / n)).astype(float)
        keep = counts > 0
        args = (N[keep], D[keep], loss[keep])
        kw: dict[str, Any] = {
            "weights": counts[keep],
            "delta": delta,
            "x0": [fit.law],
            "check": False,
        }
        try:
            f = fit_points(*args, grid=grid, n_polish=1, lazy=lazy, **kw)
        except ScalingError:
            # a line search that stalls from the fast start (it depends on the CPU's floating
            # point) is retried once from every start of the full grid before it counts as failed
            try:
                f = fit_points(*args, grid="default", n_polish=4, **kw)
            except ScalingError as e:
                failures.append(str(e))
                continue
        law = f.law
        rows.append((law.E, law.A, law.B, law.alpha, law.beta))


def bootstrap_fit(
    df: Any,
    *,
    target: str = "loss",
    n_col: str = "N",
    d_col: str = "D",
    **kwargs: Any,
) -> BootstrapResult:
    """:func:`bootstrap_points` on a run table's columns."""
    return bootstrap_points(
        df[n_col].to_numpy(dtype=float),
        df[d_col].to_numpy(dtype=float),
        df[target].to_numpy(dtype=float),
        **kwargs,
    )
