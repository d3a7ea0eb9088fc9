"""Figures of a tunnel's own stages (Agg backend, PNG files); each function returns the path.

The fits' figures (loss vs compute, residuals, bootstrap, μTransfer, batch-size law) live in
:mod:`windtunnel.scaling.plots`; these are the ones only a tunnel has: the μP search's history,
and the ladder's loss curves with their decay branches. The back-test's figure (held-out points
with their intervals, errors against extrapolation) is the one ``windtunnel fit --backtest``
draws: :func:`windtunnel.scaling.plots.backtest_intervals`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from windtunnel.scaling.plots import _plt, _save
from windtunnel.tracking.journal import metric_series
from windtunnel.tunnel.render import si


def _metric(target: str) -> str:
    return "val_bpb" if target == "bpb" else "val_loss"


def _last_intermediate(trial: dict[str, Any]) -> float | None:
    inter = trial.get("intermediate") or {}
    if not inter:
        return None
    step = max(inter, key=lambda k: int(k))
    v = inter[step]
    return float(v) if v is not None and math.isfinite(float(v)) else None


def search_history(
    trials: list[dict[str, Any]], out: Path, objective: str, *, direction: str = "minimize"
) -> Path:
    """Objective per trial number: complete trials as dots, pruned ones as x at their last
    intermediate value, failed ones counted in the title; the best so far as a step line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    done = sorted(
        (t for t in trials if t["state"] == "COMPLETE" and t.get("value") is not None),
        key=lambda t: t["number"],
    )
    pruned = [(t["number"], _last_intermediate(t)) for t in trials if t["state"] == "PRUNED"]
    pruned = [(n, v) for n, v in pruned if v is not None]
    n_failed = sum(t["state"] == "FAIL" for t in trials)
    if done:
        x = np.array([t["number"] for t in done])
        y = np.array([float(t["value"]) for t in done])
        ax.plot(x, y, "o", ms=5, color="tab:blue", label=f"complete ({len(done)})")
        best = np.minimum.accumulate(y) if direction == "minimize" else np.maximum.accumulate(y)
        last = max(t["number"] for t in trials)
        ax.step(
            [*x, last],
            [*best, best[-1]],
            where="post",
            color="tab:red",
            lw=1.5,
            label=f"best so far ({best[-1]:.4g})",
        )
    if pruned:
        px, py = zip(*pruned)
        ax.plot(px, py, "x", ms=6, color="tab:gray", label=f"pruned ({len(pruned)})")
    ys = [float(t["value"]) for t in done] + [v for _, v in pruned]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 5:
        ax.set_yscale("log")
    n = len(trials)
    ax.set(xlabel="trial", ylabel=objective)
    ax.set_title(
        f"μP search: {n} trials, {len(done)} complete, {len(pruned)} pruned, {n_failed} failed",
        fontsize=10,
    )
    if done or pruned:
        ax.legend(fontsize=8)
    return _save(fig, out, "mup_search.png")


def ladder_curves(trials: list[dict[str, Any]], out: Path, target: str) -> Path:
    """Per finished ladder trial its trunk's evaluation curve (from ``journal.jsonl``) and each
    decay branch's final point; one colour per model size, log tokens."""
    plt = _plt()
    key = _metric(target)
    done = [
        t for t in trials if t["state"] == "COMPLETE" and (t.get("result") or {}).get("branches")
    ]
    sizes: dict[str, float] = {}
    for t in done:
        name = (t.get("config") or {}).get("model", {}).get("name") or f"trial {t['number']}"
        sizes.setdefault(name, float(t["result"].get("N") or t["result"]["branches"][0]["N"]))
    order = sorted(sizes, key=sizes.__getitem__)
    cmap = plt.get_cmap("viridis")
    colour = {m: cmap(i / max(1, len(order) - 1) * 0.9) for i, m in enumerate(order)}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    labelled: set[str] = set()
    n_points = 0
    for t in done:
        name = (t.get("config") or {}).get("model", {}).get("name") or f"trial {t['number']}"
        c = colour[name]
        label = None if name in labelled else f"{name} (N={si(sizes[name])})"
        labelled.add(name)
        curve = [
            (s, v)
            for s, v in metric_series(Path(t["run_dir"]) / "journal.jsonl", key)
            if s > 0 and math.isfinite(v)
        ]
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, "-", lw=1, color=c, alpha=0.8, label=label)
            label = None
        bx = [float(b["D"]) for b in t["result"]["branches"] if b.get(key) is not None]
        by = [float(b[key]) for b in t["result"]["branches"] if b.get(key) is not None]
        ax.plot(bx, by, "o", ms=6, color=c, mec="k", mew=0.6, label=label)
        n_points += len(bx)
    ax.plot([], [], "o", color="w", mec="k", label="decay branch end")
    ax.set(xscale="log", xlabel="tokens", ylabel=key)
    ax.set_title(
        f"ladder: {len(done)} runs, {len(order)} sizes, {n_points} decayed points", fontsize=10
    )
    ax.legend(fontsize=7)
    return _save(fig, out, "ladder_curves.png")
