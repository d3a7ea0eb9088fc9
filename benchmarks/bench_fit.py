"""Benchmark of the approach-3 fitter: time to the global optimum, and 1000 bootstrap refits.

    .venv/bin/python benchmarks/bench_fit.py                 # fit + 1000 bootstrap refits
    .venv/bin/python benchmarks/bench_fit.py --reference     # + Chinchilla's 4,500-start grid
    .venv/bin/python benchmarks/bench_fit.py --data synthetic   # 250 synthetic points
    .venv/bin/python benchmarks/bench_fit.py --points 10000     # 10,000 synthetic checkpoints
    .venv/bin/python benchmarks/bench_fit.py --data olmo        # 5,729 OLMo ladder checkpoints
    .venv/bin/python benchmarks/bench_fit.py --sweep            # time and memory vs points

Data: Epoch AI's Chinchilla points (240 after dropping the 5 highest losses) from
``../shared/anchors/data`` when present, else 250 synthetic points; ``--points n``: a synthetic
ladder of 20 sizes × n/20 checkpoints (D from 1 to 200 tokens per parameter, 1 % noise);
``--data olmo``: every logged checkpoint of the OLMo model ladder (5 sizes × 4 token budgets,
HellaSwag 5-shot bpb). "Global optimum" is checked against the best of the reference grid
(``--reference``) or of 200 random L-BFGS-B starts.

Memory: ``peak_mb_tracemalloc`` is the peak of Python and numpy allocations during one fit
(tracemalloc, in a separate run so it does not slow the timed ones); ``maxrss_growth_mb`` is how
much the process's resident high-water mark (``getrusage`` ``ru_maxrss``) rose during the fits.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

from windtunnel.scaling import DataModelLaw, fit_points
from windtunnel.scaling.bootstrap import bootstrap_points
from windtunnel.scaling.fit import _Problem, single_threaded_blas

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO.parent / "shared" / "anchors" / "data"
EPOCH = ANCHORS / "epoch_chinchilla_svg_extracted_data.csv"
OLMO = ANCHORS / "olmo_ladder_peteish_final_new_curves.csv"
TRUTH = DataModelLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def ladder_points(n: int, seed: int = 0):
    """A synthetic ladder of 20 sizes × n/20 checkpoints each (D = 1…200 tokens per parameter)."""
    from windtunnel.scaling.synthetic import synthetic_points

    per = max(n // 20, 1)
    d = synthetic_points(
        TRUTH, np.geomspace(1e7, 1e10, 20), np.geomspace(1, 200, per), noise=0.01, seed=seed
    )
    return f"synthetic ladder ({len(d)} pts)", d.N.to_numpy(), d.D.to_numpy(), d.loss.to_numpy()


def load_points(kind: str = "epoch"):
    if kind == "olmo":
        d = pd.read_csv(OLMO)
        d = d[d["size"] != "7B"]
        d = d[~d["file"].str.contains("28xC")]  # the single-row 28×C runs: not checkpoints
        name = f"OLMo ladder checkpoints, hellaswag_rc5_bpb ({len(d)} pts)"
        return name, d.N.to_numpy(), d.tokens.to_numpy(), d.hellaswag_rc5_bpb.to_numpy()
    if kind == "epoch" and EPOCH.exists():
        d = pd.read_csv(EPOCH)
        d["N"] = d["Model Size"]
        d["D"] = d["Training FLOP"] / (6 * d["Model Size"])
        d = d[d["loss"] < np.sort(d["loss"].to_numpy())[-5]]
        return "epoch-chinchilla (240 pts)", d.N.to_numpy(), d.D.to_numpy(), d.loss.to_numpy()
    from windtunnel.scaling.synthetic import synthetic_points

    d = synthetic_points(TRUTH, np.geomspace(1e7, 1e10, 25), np.geomspace(2, 200, 10), noise=0.01)
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


def fit_memory(N, D, L) -> float:
    """Peak MB of Python/numpy allocations during one fit (tracemalloc)."""
    tracemalloc.start()
    fit_points(N, D, L)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def sweep(sizes: list[int], repeats: int) -> None:
    """Fit time and memory vs number of points: per-point cost should stay flat (linear)."""
    rows = []
    fit_points(*ladder_points(sizes[0])[1:])  # warm-up: imports, caches
    for n in sizes:
        _, N, D, L = ladder_points(n)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fit_points(N, D, L)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append(
            {"points": len(L), "fit_seconds": t, "peak_mb_tracemalloc": fit_memory(N, D, L)}
        )
    base = rows[0]
    for r in rows:
        r["us_per_point"] = 1e6 * r["fit_seconds"] / r["points"]
        r["time_ratio_vs_smallest"] = r["fit_seconds"] / base["fit_seconds"]
        r["points_ratio_vs_smallest"] = r["points"] / base["points"]
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1m": os.getloadavg()[0],
        "sweep": rows,
    }
    print(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reference", action="store_true", help="run Chinchilla's 4,500-start grid")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", choices=("epoch", "synthetic", "olmo"), default="epoch")
    ap.add_argument("--points", type=int, help="a synthetic ladder of this many points")
    ap.add_argument(
        "--sweep", action="store_true", help="fit time and memory at 1,250 … 20,000 points"
    )
    args = ap.parse_args()
    if args.sweep:
        sweep([1250, 2500, 5000, 10000, 20000], args.repeats)
        return

    name, N, D, L = ladder_points(args.points) if args.points else load_points(args.data)
    import scipy.optimize  # noqa: F401  (imported before the memory is measured)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fit_points(N, D, L)  # warm-up: caches
    times, fit = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fit = fit_points(N, D, L)
        times.append(time.perf_counter() - t0)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    peak = fit_memory(N, D, L)
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
        "peak_mb_tracemalloc": peak,
        "maxrss_growth_mb": rss_growth,
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
