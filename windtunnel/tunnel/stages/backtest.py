"""Back-test: the largest ladder size held out and predicted by a law fitted to the others."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from windtunnel.tunnel.render import Block, extrapolation_span, images, pct, table
from windtunnel.tunnel.spec import BacktestStage
from windtunnel.tunnel.stage import Context, PureStage
from windtunnel.tunnel.stages import ladder

TARGET_EXTRAPOLATION = 10.0
"""The back-test's goal is the target error at ≥ this many times the largest fitted compute."""


@dataclass(kw_only=True)
class BacktestResult:
    max_abs_rel_error: float
    mean_abs_rel_error: float = math.nan
    mode: str = "largest"
    points: list[dict[str, Any]] = field(default_factory=list)
    """Per held-out point: N, D, observed, predicted, rel_error, extrapolation."""
    target_error: float = 0.01
    min_extrapolation: float | None = None
    """The held-out compute over the largest fitted compute, at least."""
    plots: list[str] = field(default_factory=list)


def backtest_verdict(r: BacktestResult) -> str:
    """A plain sentence: was the target error met at ≥10× the fitted compute, and if not, why."""
    err, te = r.max_abs_rel_error, r.target_error
    ext = r.min_extrapolation
    if ext is None:
        ext = min((p["extrapolation"] for p in r.points), default=0.0)
    goal = f"≤{te:.2%} at ≥{TARGET_EXTRAPOLATION:g}×"
    ok_err, ok_ext = err <= te, ext >= TARGET_EXTRAPOLATION
    if ok_err and ok_ext:
        return f"Target met: {goal} the fitted compute (max |error| {pct(err)} at ≥{ext:.1f}×)."
    missed = []
    if not ok_err:
        missed.append(f"the error {pct(err)} is above {pct(te)}")
    if not ok_ext:
        missed.append(
            f"the held-out size is only {ext:.1f}× the largest fitted compute, short of "
            f"{TARGET_EXTRAPOLATION:g}× (widen the ladder's range of sizes)"
        )
    return f"Target not met ({goal}): " + " and ".join(missed) + "."


class Backtest(PureStage[BacktestResult]):
    name = "backtest"
    settings_type = BacktestStage
    result_type = BacktestResult
    titles = ("Back-test",)

    def run(self, ctx: Context) -> BacktestResult:
        from windtunnel.scaling.backtest import backtest
        from windtunnel.tunnel import plots

        t = ctx.tf.tunnel
        res = backtest(ladder.points(ctx), target=t.fit.target, mode="largest", form=t.fit.form)
        d = res.to_dict()
        return BacktestResult(
            **{k: d[k] for k in ("max_abs_rel_error", "mean_abs_rel_error", "mode", "points")},
            target_error=self.settings(ctx.tf).target_error,
            min_extrapolation=float(res.table["extrapolation"].min()),
            plots=[str(plots.backtest(res.table, ctx.plots(), t.fit.target))],
        )

    def headline(self, r: BacktestResult) -> str:
        return (
            f"held-out largest size: max |error| {r.max_abs_rel_error:.2%} at "
            f"≥{r.min_extrapolation:.1f}× the fitted compute"
        )

    def metrics(self, r: BacktestResult) -> dict[str, float]:
        out = {"backtest.max_abs_rel_error": r.max_abs_rel_error}
        if r.min_extrapolation is not None:
            out["backtest.min_extrapolation"] = r.min_extrapolation
        return out

    def section(self, r: BacktestResult, title: str) -> list[Block]:
        span = extrapolation_span([p["extrapolation"] for p in r.points])
        return [
            f"The largest size held out and predicted from the others: max |error| "
            f"{pct(r.max_abs_rel_error)} (mean {pct(r.mean_abs_rel_error)}) "
            f"against a target of {pct(r.target_error)}, at {span} the largest "
            "fitted compute.",
            table(
                "N|D|observed|predicted|rel. error|extrapolation",
                r.points,
                "N D observed predicted rel_error extrapolation",
            ),
            backtest_verdict(r),
            *images(r.plots, "back-test"),
        ]


STAGE = Backtest()
