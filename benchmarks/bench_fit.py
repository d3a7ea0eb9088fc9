"""Benchmark of the approach-3 fitter: time to the global optimum, and 1000 bootstrap refits.

    .venv/bin/python benchmarks/bench_fit.py                 # fit + 1000 bootstrap refits
    .venv/bin/python benchmarks/bench_fit.py --reference     # + Chinchilla's 4,500-start grid
    .venv/bin/python benchmarks/bench_fit.py --data synthetic   # 250 synthetic points

Data: Epoch AI's Chinchilla points (240 after dropping the 5 highest losses) from
``../shared/anchors/data`` when present, else 250 synthetic points. "Global optimum" is checked
against the best of the reference grid (``--reference``) or of 200 random L-BFGS-B starts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from windtunnel.scaling import DataModelLaw, fit_points
from windtunnel.scaling.bootstrap import bootstrap_points
from windtunnel.scaling.fit import _Problem, single_threaded_blas

REPO = Path(__file__).resolve().parents[1]
EPOCH = REPO.parent / "shared" / "anchors" / "data" / "epoch_chinchilla_svg_extracted_data.csv"


def load_points(kind: str = "epoch"):
    if kind == "epoch" and EPOCH.exists():
        d = pd.read_csv(EPOCH)
        d["N"] = d["Model Size"]
        d["D"] = d["Training FLOP"] / (6 * d["Model Size"])
        d = d[d["loss"] < np.sort(d["loss"].to_numpy())[-5]]
        return "epoch-chinchilla (240 pts)", d.N.to_numpy(), d.D.to_numpy(), d.loss.to_numpy()
    from windtunnel.scaling.synthetic import synthetic_points

    law = DataModelLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    d = synthetic_points(law, np.geomspace(1e7, 1e10, 25), np.geomspace(2, 200, 10), noise=0.01)
    return "synthetic (250 pts)", d.N.to_numpy(), d.D.to_numpy(), d.loss.to_numpy()


def reference_grid(N, D, L, *, chinchilla: bool):
    """Multistart L-BFGS-B on the same Huber objective (sum, as in the replications)."""
    from scipy.optimize import minimize

    prob = _Problem(N, D, L, None, 1e-3)
    if chinchilla:  # Hoffmann et al.'s grid: 5×5×5×6×6 = 4,500 starts
        starts = [
            [a, b, e, al, be]
            for al, be, e, a, b in itertools.product(
                np.arange(0, 2.5, 0.5),
                np.arange(0, 2.5, 0.5),
                np.arange(-1, 1.5, 0.5),
                np.arange(0, 30, 5),
                np.arange(0, 30, 5),
            )
        ]
    else:
        rng = np.random.default_rng(0)
        starts = np.column_stack(
            [
                rng.uniform(0, 30, 200),
                rng.uniform(0, 30, 200),
                rng.uniform(-1, 1.5, 200),
                rng.uniform(0, 2, 200),
                rng.uniform(0, 2, 200),
            ]
        )
    best = np.inf
    t0 = time.perf_counter()
    with single_threaded_blas():
        for s in starts:
            x0 = prob.centred(np.asarray(s, dtype=float))  # the fitter's θ is centred
            r = minimize(prob.value_and_grad, x0, jac=True, method="L-BFGS-B")
            best = min(best, float(r.fun))
    return best / len(L), time.perf_counter() - t0, len(starts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reference", action="store_true", help="run Chinchilla's 4,500-start grid")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", choices=("epoch", "synthetic"), default="epoch")
    args = ap.parse_args()

    name, N, D, L = load_points(args.data)
    fit_points(N, D, L)  # warm-up: imports, caches
    times, fit = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fit = fit_points(N, D, L)
        times.append(time.perf_counter() - t0)
    ref_obj, ref_s, ref_n = reference_grid(N, D, L, chinchilla=args.reference)
    t0 = time.perf_counter()
    boot = bootstrap_points(N, D, L, n_boot=args.n_boot, seed=0, fit=fit)
    boot_s = time.perf_counter() - t0
    out = {
        "data": name,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1m": os.getloadavg()[0],
        "fit_seconds_median": statistics.median(times),
        "fit_seconds_all": times,
        "fit_objective_mean_huber": fit.objective,
        "reference_objective": ref_obj,
        "reference": f"{ref_n} L-BFGS-B starts in {ref_s:.1f} s",
        "reached_global_optimum": bool(fit.objective <= ref_obj * (1 + 1e-6)),
        "params": fit.law.to_dict(),
        "bootstrap_refits": args.n_boot,
        "bootstrap_seconds": boot_s,
        "bootstrap_failed": boot.n_failed,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
