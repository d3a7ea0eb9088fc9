"""Sweep benchmarks: TPE + pruning against a full grid, and per-trial orchestration overhead.

    .venv/bin/python benchmarks/bench_sweep.py search  [--seeds 3]   # compute to reach the grid's best
    .venv/bin/python benchmarks/bench_sweep.py overhead [--launcher local|slurm] [--tracker mlflow]
        [--parallelism 2] [--no-prewarm]

search: the μP learning-rate search at micro scale (micro_xxs on the embedded corpus, 20 N tokens).
A grid of 12 log-spaced learning rates gives the best loss and the grid's compute (tokens). Then,
for each seed, TPE with median pruning runs trial by trial; we record the compute (tokens actually
trained, pruned trials included) spent until a trial first comes within 1% of the grid's best.

overhead: trials whose training takes a known time; overhead = wall time of the trial as the
driver sees it (submit → result) minus the training time measured inside the trial, as a share
of a 60 s trial.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = [round(10 ** (-3 + 2 * i / 11), 6) for i in range(12)]  # 1e-3 … 1e-1


def _spec(folder: Path, *overrides: str):
    from windtunnel.sweep import load_sweep

    return load_sweep(
        REPO / "sweeps/smoke.yaml",
        [
            f"sweep.dir={folder}",
            "launcher=inline",
            "sweep.parallelism=1",
            "model=micro_xxs",
            "train.tokens_per_param=20",
            "train.eval_every_tokens=32768",
            "tracker=none",
            f"run_dir={folder}/runs",
            *overrides,
        ],
    )


def _trials(spec):
    import optuna

    from windtunnel.sweep.driver import storage_url
    from windtunnel.sweep.trial import open_storage

    return optuna.load_study(
        study_name=spec.sweep.name, storage=open_storage(storage_url(spec))
    ).get_trials()


def search(seeds: int, n_trials: int) -> dict:
    from optuna.trial import TrialState

    from windtunnel.sweep import run_sweep

    root = Path(tempfile.mkdtemp(prefix="wt-bench-search-"))
    grid_spec = _spec(
        root / "grid",
        "sweep.name=grid",
        "sweep.sampler.kind=grid",
        "sweep.pruner.kind=none",
        f"sweep.n_trials={len(GRID)}",
        f"sweep.space.lr.grid=[{','.join(map(str, GRID))}]",
    )
    t0 = time.time()
    run_sweep(grid_spec)
    grid = [t for t in _trials(grid_spec) if t.state == TrialState.COMPLETE]
    best = min(t.value for t in grid)
    grid_tokens = sum(t.user_attrs["tokens"] for t in grid)
    print(
        f"grid: {len(grid)} lrs, best {best:.4f} bpb, {grid_tokens:,} tokens, {time.time() - t0:.0f} s",
        file=sys.stderr,
    )
    rows = []
    for seed in range(seeds):
        spec = _spec(
            root / f"tpe{seed}",
            f"sweep.name=tpe{seed}",
            "sweep.sampler.kind=tpe",
            f"sweep.sampler.seed={seed}",
            "sweep.sampler.n_startup_trials=4",
            "sweep.pruner.kind=median",
            "sweep.pruner.n_startup_trials=3",
            "sweep.pruner.n_warmup_evals=2",
            f"sweep.n_trials={n_trials}",
        )
        run_sweep(spec)
        spent, reached = 0, None
        for t in sorted(_trials(spec), key=lambda t: t.number):
            spent += t.user_attrs.get("tokens") or 0
            if t.state == TrialState.COMPLETE and t.value <= best * 1.01 and reached is None:
                reached = (t.number + 1, spent)
        pruned = sum(t.state == TrialState.PRUNED for t in _trials(spec))
        row = {
            "seed": seed,
            "trials_to_1pct": reached[0] if reached else None,
            "compute_share": reached[1] / grid_tokens if reached else math.nan,
            "best": min(
                (t.value for t in _trials(spec) if t.state == TrialState.COMPLETE), default=math.nan
            ),
            "pruned": pruned,
        }
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return {"grid_best": best, "grid_tokens": grid_tokens, "grid_lrs": GRID, "runs": rows}


def overhead(
    launcher: str, trials: int, parallelism: int = 1, prewarm: bool = True, tracker: str = "jsonl"
) -> dict:
    from windtunnel.launch import make_launcher
    from windtunnel.sweep import Driver

    root = Path(tempfile.mkdtemp(prefix="wt-bench-overhead-"))
    extra = ["launcher.partition=low"] if launcher == "slurm" else []
    if launcher == "local" and not prewarm:
        extra.append("launcher.prewarm=false")
    spec = _spec(
        root,
        f"launcher={launcher}",
        *extra,
        "sweep.name=overhead",
        "sweep.sampler.kind=random",
        "sweep.pruner.kind=none",
        f"sweep.n_trials={trials}",
        f"sweep.parallelism={parallelism}",
        f"tracker={tracker}",
    )
    drv = Driver(spec)
    walls: dict[int, float] = {}
    submit = drv._submit

    def timed_submit(launcher_, trial_id, number, params, resumed=False):
        walls[number] = time.perf_counter()
        submit(launcher_, trial_id, number, params, resumed)

    drv._submit = timed_submit  # type: ignore[method-assign]
    collect = drv._collect

    def timed_collect(launcher_, number):
        walls[number] = time.perf_counter() - walls[number]
        collect(launcher_, number)

    drv._collect = timed_collect  # type: ignore[method-assign]
    with make_launcher(spec.launcher) as lau:
        drv.run(lau, poll_s=0.05)
    rows = []
    for number, wall in sorted(walls.items()):
        result = json.loads(
            (root / "overhead" / "runs" / f"overhead-t{number:04d}" / "result.json").read_text()
        )
        train_s = result["seconds"]
        rows.append(
            {"trial": number, "wall_s": wall, "train_s": train_s, "overhead_s": wall - train_s}
        )
    mean_over = sum(r["overhead_s"] for r in rows) / len(rows)
    return {
        "launcher": launcher,
        "prewarm": prewarm,
        "tracker": tracker,
        "parallelism": parallelism,
        "trials": rows,
        "mean_overhead_s": mean_over,
        "share_of_60s_trial": mean_over / 60,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["search", "overhead"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--launcher", default="local")
    p.add_argument("--parallelism", type=int, default=1, help="overhead: trials at once")
    p.add_argument("--no-prewarm", action="store_true", help="overhead: fresh local processes")
    p.add_argument(
        "--tracker", default="jsonl", choices=["jsonl", "mlflow"], help="overhead: run tracking"
    )
    a = p.parse_args()
    if a.what == "search":
        out = search(a.seeds, a.trials)
    else:
        out = overhead(a.launcher, a.trials, a.parallelism, not a.no_prewarm, a.tracker)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
