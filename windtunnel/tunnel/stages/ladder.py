"""WSD ladder: models of several sizes, each trunk with decay branches at several token counts;
one decayed (N, D, loss) point per branch, the data behind the fit and the back-test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from windtunnel.tunnel.render import Block, images, table
from windtunnel.tunnel.stage import Context, TunnelError
from windtunnel.tunnel.stages.mup_search import AfterSearch
from windtunnel.tunnel.stages.sweeps import SweepResult, compact, finished, records


@dataclass(kw_only=True)
class LadderPoint:
    """One decay branch of a ladder run."""

    model: str
    N: float
    D: float
    C: float
    """Training FLOPs."""
    loss: float
    bpb: float
    run_id: str | None = None


@dataclass(kw_only=True)
class LadderResult(SweepResult):
    points: list[LadderPoint] = field(default_factory=list)


POINT_COLUMNS = [f.name for f in LadderPoint.__dataclass_fields__.values()]


def ladder_points(trials: list[dict[str, Any]]) -> pd.DataFrame:
    """The data–model points: one row per decay branch of every finished ladder trial."""
    rows = []
    for t in finished(trials):
        model = t["config"]["model"]["name"]
        for b in t["result"]["branches"]:
            rows.append(
                {
                    "model": model,
                    "N": float(b["N"]),
                    "D": float(b["D"]),
                    "C": float(b["flops"]),
                    "loss": float(b["val_loss"]),
                    "bpb": float(b["val_bpb"]),
                    "run_id": b["run_id"],
                }
            )
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


class Ladder(AfterSearch[LadderResult]):
    name = "ladder"
    result_type = LadderResult
    titles = ("Ladder points",)
    appendix = True  # the raw data: after the findings

    def run(self, ctx: Context) -> LadderResult:
        from windtunnel.tunnel import plots

        summary, trials = self.sweep(ctx, self.spec(ctx))
        df = ladder_points(trials)
        df.to_csv(ctx.folder / "ladder_points.csv", index=False)
        return LadderResult(
            summary=summary,
            trials=compact(trials),
            points=[LadderPoint(**r) for r in records(df)],
            plots=[str(plots.ladder_curves(trials, ctx.plots(), ctx.tf.tunnel.fit.target))],
        )

    def headline(self, r: LadderResult) -> str:
        sizes = sorted({p.model for p in r.points})
        return f"{len(r.points)} points from {len(sizes)} sizes ({', '.join(sizes)})"

    def section(self, r: LadderResult, title: str) -> list[Block]:
        pts = sorted(r.points, key=lambda p: (p.N, p.D))
        return [
            f"{len(pts)} decayed points (one per WSD decay branch) — the data behind the fit.",
            table(
                "model|N|D|D/N|C (FLOPs)|loss|bpb",
                [{**asdict(p), "ratio": p.D / p.N} for p in pts],
                "model N D ratio C loss bpb",
            ),
            *images(r.plots, "ladder"),
        ]


STAGE = Ladder()


def points(ctx: Context) -> pd.DataFrame:
    """The ladder's points as a table (the fit's and back-test's input)."""
    ladder = ctx.result(STAGE)
    if ladder is None or not ladder.points:
        raise TunnelError("the fit needs the ladder's points: run the ladder stage first")
    return pd.DataFrame([asdict(p) for p in ladder.points], columns=POINT_COLUMNS)
