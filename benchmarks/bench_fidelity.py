"""Fidelity benchmark: rollout back-tests and 90% coverage on public scaling ladders.

    .venv/bin/python benchmarks/bench_fidelity.py                # every ladder found, markdown
    .venv/bin/python benchmarks/bench_fidelity.py --n-boot 100 --json out.json
    .venv/bin/python benchmarks/bench_fidelity.py --points \
        .windtunnel/tunnels/long_ladder/ladder_points.csv --n-col N_total  # a tunnel's ladder

For each ladder: fit the data–model law on the k smallest model sizes and predict every point of
every larger size, for every k ≥ 3 (``--max-folds`` caps the folds of long ladders, k spread
evenly); each prediction carries a 90% prediction interval (bootstrap + lack of fit + seed
noise, :mod:`windtunnel.scaling.intervals`). Reported: mean and max |relative error| of the
held-out points at ≥2× and ≥10× the largest fitted compute, and coverage (share of held-out
points inside their interval; nominal 0.90).

Data (``../shared/anchors/data``, README there; each ladder is skipped with its reason where
absent or unusable):

- ``epoch-chinchilla``: Hoffmann et al.'s points as re-extracted by Epoch AI (240 after
  dropping the 5 highest losses, as Epoch does); D = C/(6N).
- ``gadre-<dataset>``: Gadre et al. 2024, 104 models over three training sets, C4 validation
  loss (the one the paper fits), one ladder per training set.
- ``olmo-<task>``: OLMo peteish ladder (Bhagia et al. 2024), the final checkpoint of each
  (size, multiple of Chinchilla) run and the 7B 28×C anneal run, task bpb (the LM losses were
  dropped from the anchor file; see its README). The ladders' single "28xC" rows carry
  tokens = N, not 28×20·N, and are left out.
- ``li-misfitting``: Li et al. 2025, final checkpoints, the best loss over peak learning rates
  and sweeps at each (N, D).
- ``--points CSV``: a windtunnel ladder's ``ladder_points.csv`` (e.g. ``tunnels/long_ladder.yaml``,
  the CPU ladder whose largest held-out points sit 13–31× beyond the largest fitted compute), its target
  ``--target`` (bpb) and parameter convention ``--n-col`` (N, N_head or N_total); seed repeats
  stay separate points and give the noise floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from windtunnel.scaling.backtest import backtest

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO.parent / "shared" / "anchors" / "data"


class Unusable(Exception):
    """A ladder that cannot be back-tested here (file absent, columns missing)."""


def _read(name: str) -> pd.DataFrame:
    p = ANCHORS / name
    if not p.exists():
        raise Unusable(f"{p} absent (the shared anchors folder is not checked out)")
    return pd.read_csv(p)


def _need(d: pd.DataFrame, cols: list[str], name: str) -> None:
    miss = [c for c in cols if c not in d.columns]
    if miss:
        raise Unusable(f"{name} lacks column(s) {miss}")


def epoch() -> pd.DataFrame:
    d = _read("epoch_chinchilla_svg_extracted_data.csv")
    _need(d, ["Model Size", "Training FLOP", "loss"], "epoch")
    d = d[d["loss"] < np.sort(d["loss"].to_numpy())[-5]]
    N = d["Model Size"].to_numpy(float)
    C = d["Training FLOP"].to_numpy(float)
    return pd.DataFrame({"N": N, "D": C / (6 * N), "C": C, "loss": d["loss"].to_numpy(float)})


def gadre(dataset: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        d = _read("gadre2024_overtraining_104_models.csv")
        _need(d, ["dataset", "N", "D", "loss_c4_val"], "gadre")
        d = d[d["dataset"] == dataset]
        if d.empty:
            raise Unusable(f"no gadre rows for dataset {dataset!r}")
        N, D = d["N"].to_numpy(float), d["D"].to_numpy(float)
        return pd.DataFrame({"N": N, "D": D, "C": 6 * N * D, "loss": d["loss_c4_val"].to_numpy()})

    return load


def olmo(task: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        d = _read("olmo_ladder_peteish_final_new_curves.csv")
        _need(d, ["file", "N", "tokens", task], "olmo")
        keep = ~d["file"].str.contains("28xC") | (d["file"] == "7B-28xC-anneal-new.csv")
        d = d[keep & d[task].notna()]
        last = d.loc[d.groupby("file")["tokens"].idxmax()]
        N, D = last["N"].to_numpy(float), last["tokens"].to_numpy(float)
        return pd.DataFrame({"N": N, "D": D, "C": 6 * N * D, "loss": last[task].to_numpy(float)})

    return load


def li() -> pd.DataFrame:
    d = _read("li2025_misfitting_scaling_results_last_ckpt_only.csv")
    _need(d, ["N", "D", "loss"], "li")
    best = d.groupby(["N", "D"], as_index=False)["loss"].min()
    N, D = best["N"].to_numpy(float), best["D"].to_numpy(float)
    return pd.DataFrame({"N": N, "D": D, "C": 6 * N * D, "loss": best["loss"].to_numpy(float)})


LADDERS: dict[str, Callable[[], pd.DataFrame]] = {
    "epoch-chinchilla": epoch,
    "gadre-c4_original": gadre("c4_original"),
    "gadre-rpj": gadre("rpj"),
    "gadre-rw_original": gadre("rw_original"),
    "olmo-hellaswag_rc5_bpb": olmo("hellaswag_rc5_bpb"),
    "olmo-arc_easy_rc5_bpb": olmo("arc_easy_rc5_bpb"),
    "li-misfitting": li,
}


def _pct(x: float | None) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{100 * x:.2f}%"


def _at(s: dict[str, object], key: str, stat: str) -> float | None:
    v = s["at_least"][key]  # type: ignore[index]
    return v.get(stat) if v.get("n") else None  # type: ignore[no-any-return,union-attr]


def tunnel_points(path: Path, target: str, n_col: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        if not path.exists():
            raise Unusable(f"{path} absent (run the tunnel first)")
        d = pd.read_csv(path)
        _need(d, ["N", "D", target, n_col], str(path))
        if not (d[n_col] > 0).all():
            raise Unusable(f"{path}: column {n_col} is not recorded for every point")
        out = pd.DataFrame({"N": d[n_col], "D": d["D"], "loss": d[target]})
        out["C"] = 6 * out["N"] * out["D"]
        if "seed" in d.columns:
            out["seed"] = d["seed"]
        return out

    return load


def run_one(name: str, load: Callable[[], pd.DataFrame], args: argparse.Namespace) -> dict:
    d = load()
    bt = backtest(d, mode="rollout", n_boot=args.n_boot, seed=args.seed, max_folds=args.max_folds)
    s = bt.summary()
    t = bt.table
    last = t[(t["k"] == t["k"].max()) & (t["N"] == t["N"].max())].sort_values("D").iloc[-1]
    return {
        "largest_point": {
            k: last[k]
            for k in ("k", "N", "D", "observed", "predicted", "lo", "hi", "extrapolation", "inside")
        },
        "dataset": name,
        "points": len(d),
        "sizes": s["n_sizes"],
        "folds": s["n_folds"],
        "held_out": s["all"]["n"],
        "mean_2x": _at(s, "2×", "mean_abs_rel_error"),
        "max_2x": _at(s, "2×", "max_abs_rel_error"),
        "n_2x": s["at_least"]["2×"]["n"],
        "mean_10x": _at(s, "10×", "mean_abs_rel_error"),
        "max_10x": _at(s, "10×", "max_abs_rel_error"),
        "n_10x": s["at_least"]["10×"]["n"],
        "coverage": s["all"]["coverage"],
        "coverage_10x": _at(s, "10×", "coverage"),
        "half_width_10x": _at(s, "10×", "mean_half_width"),
        "flags": s["flags"],
        "skipped": s["skipped"],
        "seconds": bt.seconds,
        "summary": s,
    }


def markdown(results: list[dict]) -> str:
    head = (
        "| dataset | points | sizes | rollout folds | held-out pts | mean / max abs err ≥2× "
        "| mean / max abs err ≥10× | 90% coverage (all / ≥10×) | ±half-width ≥10× | s |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        lines.append(
            f"| {r['dataset']} | {r['points']} | {r['sizes']} | {r['folds']} | {r['held_out']} "
            f"| {_pct(r['mean_2x'])} / {_pct(r['max_2x'])} (n={r['n_2x']}) "
            f"| {_pct(r['mean_10x'])} / {_pct(r['max_10x'])} (n={r['n_10x']}) "
            f"| {_pct(r['coverage'])} / {_pct(r['coverage_10x'])} "
            f"| {_pct(r['half_width_10x'])} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-boot", type=int, default=50, help="bootstrap refits per fold")
    ap.add_argument("--max-folds", type=int, default=10, help="cap on the rollout's folds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", default=None, help="ladder name (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    ap.add_argument("--points", type=Path, action="append", default=[], help="a ladder_points.csv")
    ap.add_argument("--target", default="bpb", help="column of --points to fit (bpb or loss)")
    ap.add_argument("--n-col", default="N", choices=["N", "N_head", "N_total"], help="N convention")
    args = ap.parse_args()
    results, skipped = [], []
    t0 = time.perf_counter()
    ladders = dict(LADDERS)
    for p in args.points:
        ladders[f"{p.parent.name}-{args.target}-{args.n_col}"] = tunnel_points(
            p, args.target, args.n_col
        )
    for name, load in ladders.items():
        if args.only and name not in args.only and name in LADDERS:
            continue
        try:
            results.append(run_one(name, load, args))
        except Unusable as e:
            print(f"skip {name}: {e}")
            skipped.append({"dataset": name, "reason": str(e)})
    print(
        f"rollout back-tests, {args.n_boot} bootstrap refits per fold, seed {args.seed}, "
        f"≤{args.max_folds} folds; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {time.perf_counter() - t0:.0f} s\n"
    )
    print(markdown(results))
    print("\nlargest point of the last fold (the ladder's top rung predicted from the rest):")
    for r in results:
        p = r["largest_point"]
        print(
            f"  {r['dataset']}: N {p['N']:.3g}, D {p['D']:.3g} (k={p['k']}, "
            f"{p['extrapolation']:.3g}×): observed {p['observed']:.4f}, predicted "
            f"{p['predicted']:.4f} [{p['lo']:.4f}, {p['hi']:.4f}], "
            f"{'inside' if p['inside'] else 'OUTSIDE'}"
        )
    for r in results:
        for f in r["flags"] + [f"skipped {x}" for x in r["skipped"]]:
            print(f"  {r['dataset']}: {f}")
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "skipped": skipped}, indent=1, default=float)
        )


if __name__ == "__main__":
    main()
