"""Batch-size law: how the optimal batch (tokens per step) grows as the loss falls (MiniCPM's
iso-loss fit over the evaluation curves of several batch sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from windtunnel.tracking.journal import metric_series
from windtunnel.tunnel.render import Block, images, table
from windtunnel.tunnel.stage import Context
from windtunnel.tunnel.stages.mup_search import AfterSearch
from windtunnel.tunnel.stages.sweeps import (
    SweepResult,
    compact,
    finished,
    records,
)


@dataclass(kw_only=True)
class BatchSizeResult(SweepResult):
    law: dict[str, Any] = field(default_factory=dict)
    """The law's ``to_dict`` (``k``, ``gamma``, ...) with its iso-loss ``points``, or
    ``{"skipped": why}``."""


def batch_curves(trials: list[dict[str, Any]], target: str) -> pd.DataFrame:
    """Evaluation curves (run, batch tokens, N, tokens, loss) of every finished trial."""
    key = "val_bpb" if target == "bpb" else "val_loss"
    rows = []
    for t in finished(trials):
        cfg = t["config"]
        batch_tokens = cfg["optim"]["batch_size"] * cfg["data"]["seq_len"]
        N = t["result"]["N"]
        for step, values in metric_series(Path(t["run_dir"]) / "journal.jsonl", key):
            if step > 0:
                rows.append(
                    {
                        "run_id": t["number"],
                        "batch_tokens": float(batch_tokens),
                        "N": float(N),
                        "tokens": float(step),
                        "loss": values,
                    }
                )
    return pd.DataFrame(rows, columns=["run_id", "batch_tokens", "N", "tokens", "loss"])


def batch_law(curves: pd.DataFrame) -> Any:
    """MiniCPM's iso-loss batch-size law on the curves (levels between the 5% and 35%
    quantiles of the observed losses, where every batch size has a chance to reach them)."""
    from windtunnel.scaling.batch_lr import batch_size_law_iso_loss

    lo, hi = np.quantile(curves["loss"], [0.05, 0.35])
    return batch_size_law_iso_loss(curves, list(np.linspace(lo, hi, 6)), group_col="N")


class BatchSize(AfterSearch[BatchSizeResult]):
    name = "batch_size"
    result_type = BatchSizeResult
    titles = ("Batch-size law",)

    def run(self, ctx: Context) -> BatchSizeResult:
        from windtunnel.scaling import plots
        from windtunnel.scaling.errors import ScalingError

        summary, trials = self.sweep(ctx, self.spec(ctx))
        out = BatchSizeResult(summary=summary, trials=compact(trials))
        curves = batch_curves(trials, ctx.tf.tunnel.fit.target)
        curves.to_csv(ctx.folder / "batch_curves.csv", index=False)
        try:
            law = batch_law(curves)
            out.law = {**law.to_dict(), "points": records(law.points)}
            out.plots = [str(plots.batch_size_law(law, ctx.plots()))]
        except ScalingError as e:
            out.law = {"skipped": str(e)}
        return out

    def headline(self, r: BatchSizeResult) -> str:
        law = r.law
        if "k" not in law:
            return f"batch-size law not fitted: {law.get('skipped')}"
        return f"bs_opt = {law['k']:.3g} / L^{law['gamma']:.3g} tokens"

    def section(self, r: BatchSizeResult, title: str) -> list[Block]:
        law = r.law
        if "k" not in law:
            return [f"The batch-size law was not fitted: {law.get('skipped', 'no result')}."]
        out: list[Block] = [
            f"bs_opt(L) = {law['k']:.3g} / L^{law['gamma']:.3g} tokens per step (MiniCPM found "
            "1.21e9 / L^6.24 with L in nats on their data)."
        ]
        pts = law.get("points") or []
        if pts:
            out.append(
                table(
                    "iso-loss level|group (N)|bs_opt (tokens)|tokens to reach|centred",
                    pts,
                    "level group bs_opt tokens_opt centred",
                )
            )
        return out + images(r.plots, "batch-size law")


def batch_size_law(r: BatchSizeResult | None) -> dict[str, Any] | None:
    """The fitted law's ``k``, ``gamma`` and the ``loss_range`` of its iso-loss levels (read from
    its points when an older result lacks it); None when there is no law."""
    if r is None or "k" not in r.law:
        return None
    out: dict[str, Any] = {k: r.law[k] for k in ("k", "gamma")}
    levels = [float(p["level"]) for p in r.law.get("points") or [] if p.get("level") is not None]
    if r.law.get("loss_range"):
        out["loss_range"] = list(r.law["loss_range"])
    elif levels:
        out["loss_range"] = [min(levels), max(levels)]
    return out


STAGE = BatchSize()
