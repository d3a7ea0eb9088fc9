"""Matplotlib figures of the fits (Agg backend, PNG files). Each function returns the path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd


def _plt() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / name
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    _plt().close(fig)
    return p


def loss_vs_compute(df: pd.DataFrame, fit: Any, out: Path, *, target: str = "loss") -> Path:
    """Every point, the frontier, and the fitted law's compute-optimal curve."""
    from windtunnel.scaling.allocation import compute_optimal
    from windtunnel.scaling.isoflop import frontier

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sc = ax.scatter(df["C"], df[target], c=np.log10(df["N"]), s=14, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="log10 N")
    fr = frontier(df, target=target)
    ax.plot(fr["C"], fr[target], "k--", lw=1, label="frontier (approach 1)")
    C = np.geomspace(df["C"].min(), df["C"].max() * 100, 200)
    ax.plot(C, [compute_optimal(fit.law, c).loss for c in C], "r-", label="law at N_opt(C)")
    ax.set(xscale="log", xlabel="C (FLOPs)", ylabel=target, title="loss vs compute")
    ax.legend()
    return _save(fig, out, "loss_vs_compute.png")


def fitted_vs_observed(df: pd.DataFrame, fit: Any, out: Path, *, target: str = "loss") -> Path:
    plt = _plt()
    pred = fit.predict(df["N"], df["D"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    a1.scatter(df[target], pred, s=12)
    lo, hi = float(df[target].min()), float(df[target].max())
    a1.plot([lo, hi], [lo, hi], "k--", lw=1)
    a1.set(xlabel=f"observed {target}", ylabel="fitted", title="fitted vs observed")
    a2.scatter(df["C"], 100 * (pred / df[target] - 1), s=12, c=np.log10(df["N"]))
    a2.axhline(0, color="k", lw=1)
    a2.set(xscale="log", xlabel="C (FLOPs)", ylabel="residual (%)", title="residuals")
    return _save(fig, out, "fitted_vs_observed.png")


def isoflop_curves(df: pd.DataFrame, iso: Any, out: Path, *, target: str = "loss") -> Path:
    from windtunnel.scaling.isoflop import group_budgets

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    C = group_budgets(df["C"].to_numpy())
    for c in np.unique(C):
        sel = c == C
        d = df[sel].sort_values("N")
        ax.plot(d["N"], d[target], ".-", lw=0.8, label=f"{c:.1e}")
    prof = iso.profiles
    ax.plot(prof["N_opt"], prof["loss_opt"], "k*", ms=10, label="minima")
    ax.set(xscale="log", xlabel="N", ylabel=target, title=f"IsoFLOP profiles (a = {iso.a:.3f})")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, out, "isoflop.png")


def lr_sweeps(
    df: pd.DataFrame, check: Any, out: Path, *, target: str = "loss", verdict: Any = None
) -> Path:
    """Loss against lr per width; with a :class:`~windtunnel.scaling.mutransfer.TransferVerdict`
    each width's optimum and its interval are drawn in the width's colour, and the title is the
    verdict."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = {}
    for w, g in df.groupby("width"):
        g = g.groupby("lr", as_index=False)[[target]].mean()
        (line,) = ax.plot(g["lr"], g[target], "o-", ms=3, label=f"width {w:g}")
        colours[float(cast("float", w))] = line.get_color()
    if verdict is None:
        for _, r in check.table.iterrows():
            ax.axvline(r["lr_opt"], color="grey", lw=0.5)
        title = f"μTransfer: slope {check.slope:+.2f}, {'stable' if check.stable else 'UNSTABLE'}"
    else:
        for o in verdict.optima:
            c = colours.get(o.width, "grey")
            ax.axvline(o.lr_opt, color=c, lw=0.8, ls="--")
            if o.lr_lo is not None and o.lr_hi is not None:
                ax.axvspan(o.lr_lo, o.lr_hi, color=c, alpha=0.12)
        slope = "" if verdict.slope is None else f", slope {verdict.slope:+.2f}"
        title = f"μTransfer: {verdict.verdict}{slope}"
    ax.set(xscale="log", xlabel="base lr", ylabel=target)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, out, "lr_sweeps.png")


def batch_size_law(law: Any, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if law.points is not None and len(law.points):
        ax.scatter(law.points["level"], law.points["bs_opt"], s=16, label="iso-loss optima")
        L = np.geomspace(law.points["level"].min() * 0.9, law.points["level"].max() * 1.1, 100)
    else:
        L = np.linspace(2.0, 4.0, 100)
    ax.plot(L, law(L), "r-", label=f"bs = {law.k:.3g} / L^{law.gamma:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="loss", ylabel="optimal batch (tokens)")
    ax.legend()
    return _save(fig, out, "batch_size_law.png")


def bootstrap_distributions(boot: Any, out: Path, *, budget: float = 1e21) -> Path:
    plt = _plt()
    d = boot.derived(budget)
    al, be = boot.samples[:, 3], boot.samples[:, 4]
    panels = [
        ("alpha", al),
        ("beta", be),
        ("a = β/(α+β)", be / (al + be)),
        (f"D/N at C={budget:.0e}", d["tokens_per_param"]),
        (f"N_opt at C={budget:.0e}", d["N_opt"]),
        (f"loss at C={budget:.0e}", d["loss"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, (name, v) in zip(axes.ravel(), panels):
        finite = v[np.isfinite(v)]
        if len(finite) < len(v):  # a replicate whose law diverges at this budget
            name += f" ({len(v) - len(finite)} of {len(v)} not finite)"
        ax.set_title(name, fontsize=9)
        if not len(finite):
            continue
        ax.hist(finite, bins=40, color="tab:blue", alpha=0.8)
        lo, hi = boot.interval(v)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            continue
        ax.axvline(lo, color="k", ls="--", lw=1)
        ax.axvline(hi, color="k", ls="--", lw=1)
    fig.suptitle(f"bootstrap ({len(boot.samples)} refits, seed {boot.seed}, {boot.level:.0%})")
    return _save(fig, out, "bootstrap.png")


def backtest_intervals(bt: Any, out: Path, *, target: str = "loss") -> Path:
    """Back-test points: predicted vs observed with their intervals, and the relative error
    against the compute extrapolation factor (hollow markers: observed outside the interval)."""
    plt = _plt()
    t = bt.table
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    ext = np.log10(t["extrapolation"].clip(lower=1e-3))
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(float(ext.min()), max(float(ext.max()), float(ext.min()) + 1e-9))
    yerr = np.vstack([t["predicted"] - t["lo"], t["hi"] - t["predicted"]])
    obs = t["observed"].to_numpy(float)
    rel = 100 * (t[["lo", "hi"]].to_numpy(float) / obs[:, None] - 1)
    err = 100 * t["rel_error"].to_numpy(float)
    for i in range(len(t)):
        c = cmap(norm(ext.iloc[i]))
        face = c if bool(t["inside"].iloc[i]) else "none"
        a1.errorbar(obs[i], t["predicted"].iloc[i], yerr=yerr[:, i : i + 1], fmt="o", ms=4,
                    color=c, mfc=face, elinewidth=0.8, capsize=2)  # fmt: skip
        a2.errorbar(t["extrapolation"].iloc[i], err[i],
                    yerr=[[err[i] - rel[i, 0]], [rel[i, 1] - err[i]]], fmt="o", ms=4, color=c,
                    mfc=face, elinewidth=0.8, capsize=2)  # fmt: skip
    lo, hi = float(min(obs.min(), t["lo"].min())), float(max(obs.max(), t["hi"].max()))
    a1.plot([lo, hi], [lo, hi], "k--", lw=1)
    a1.set(xlabel=f"observed {target}", ylabel=f"predicted {target}",
           title=f"held-out points, {bt.level:.0%} intervals")  # fmt: skip
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(sm, ax=a1, label="log10 extrapolation (C / largest fitted C)")
    a2.axhline(0, color="k", lw=1)
    a2.axvline(1, color="grey", lw=0.5, ls=":")
    a2.set(xscale="log", xlabel="compute extrapolation ×", ylabel="predicted / observed − 1 (%)")
    a2.set_title(
        f"{bt.mode}: coverage {bt.coverage:.0%} ({int(t['inside'].sum())}/{len(t)}), "
        f"max |error| {bt.max_abs_error:.2%}",
        fontsize=10,
    )
    return _save(fig, out, "backtest.png")
