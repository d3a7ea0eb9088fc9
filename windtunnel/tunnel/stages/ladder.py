"""WSD ladder: models of several sizes, each trunk with decay branches at several token counts;
one decayed (N, D, loss) point per branch, the data behind the fit and the back-test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from windtunnel.sweep.spec import ParamConfig, SweepSpec, grid_size
from windtunnel.tunnel.render import Block, images, table
from windtunnel.tunnel.spec import TunnelSpec
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
    seed: int = 0
    """``train.seed`` of the run (init and data order): repeats measure the noise floor."""
    N_head: float = 0.0
    """Non-embedding parameters plus the output head's (vocab × d_model, tied or not); 0: not
    recorded (results from before)."""
    N_total: float = 0.0
    """Every parameter (the embedding once when tied to the head); 0: not recorded."""


@dataclass(kw_only=True)
class LadderResult(SweepResult):
    points: list[LadderPoint] = field(default_factory=list)
    noise_sd: float = 0.0
    """Pooled standard deviation of log(target) across seeds at equal (N, D) (0: no repeats)."""
    noise_dof: int = 0
    dim_model_base: int = 0
    """The proxies' μP base width (0: unknown, results from before it was kept)."""
    d_head: int = 0
    """The proxies' head size (0: unknown): the planned model keeps it."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """The proxies' lr schedule (empty: unknown): the planned run keeps it."""


POINT_COLUMNS = [f.name for f in LadderPoint.__dataclass_fields__.values()]


def _head_params(cfg: dict[str, Any]) -> tuple[float, bool]:
    """The output head's parameters (vocab × d_model) and whether the embedding is a second
    matrix (untied); (0, False) when the config does not say (the conventions then equal N)."""
    m = cfg.get("model") or {}
    vocab = m.get("vocab_size") or (cfg.get("data") or {}).get("vocab_size") or 0
    return float(vocab) * float(m.get("d_model") or 0), not m.get("tie_embeddings", True)


def with_seeds(spec: SweepSpec, k: int) -> SweepSpec:
    """The ladder's sweep with a seed dimension (``train.seed`` 0…k−1) when k > 1."""
    if k > 1:
        spec.sweep.space["seed"] = ParamConfig(
            key="train.seed", kind="categorical", choices=list(range(k))
        )
        spec.sweep.n_trials = grid_size(spec.sweep.space)
        spec.validate()
    return spec


def ladder_points(trials: list[dict[str, Any]]) -> pd.DataFrame:
    """The data–model points: one row per decay branch of every finished ladder trial."""
    rows = []
    for t in finished(trials):
        model = t["config"]["model"]["name"]
        seed = int((t["config"].get("train") or {}).get("seed", 0))
        head, untied = _head_params(t["config"])
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
                    "seed": seed,
                    "N_head": float(b["N"]) + head,
                    "N_total": float(b["N"]) + head * (2 if untied else 1),
                }
            )
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


class Ladder(AfterSearch[LadderResult]):
    name = "ladder"
    result_type = LadderResult
    titles = ("Ladder points",)
    appendix = True  # the raw data: after the findings

    def spec(self, ctx: Context) -> SweepSpec:
        return with_seeds(super().spec(ctx), self.settings(ctx.tf).seeds)

    def estimate_spec(self, tf: TunnelSpec) -> SweepSpec:
        return with_seeds(super().estimate_spec(tf), self.settings(tf).seeds)

    def run(self, ctx: Context) -> LadderResult:
        from windtunnel.scaling.intervals import seed_noise
        from windtunnel.tunnel import plots

        summary, trials = self.sweep(ctx, self.spec(ctx))
        df = ladder_points(trials)
        df.to_csv(ctx.folder / "ladder_points.csv", index=False)
        sd, dof = seed_noise(df, target=ctx.tf.tunnel.fit.target) if len(df) else (0.0, 0)
        return LadderResult(
            summary=summary,
            trials=compact(trials),
            points=[LadderPoint(**r) for r in records(df)],
            plots=[str(plots.ladder_curves(trials, ctx.plots(), ctx.tf.tunnel.fit.target))],
            noise_sd=sd,
            noise_dof=dof,
            **family(trials),
        )

    def headline(self, r: LadderResult) -> str:
        sizes = sorted({p.model for p in r.points})
        line = f"{len(r.points)} points from {len(sizes)} sizes ({', '.join(sizes)})"
        seeds = len({p.seed for p in r.points})
        if r.noise_dof:
            line += f"; {seeds} seeds: noise floor ±{r.noise_sd:.2%}"
        return line

    def section(self, r: LadderResult, title: str) -> list[Block]:
        pts = sorted(r.points, key=lambda p: (p.N, p.D, p.seed))
        ratios: dict[str, set[int]] = {}
        for p in pts:
            ratios.setdefault(p.model, set()).add(round(p.D / p.N))
        span = "; ".join(f"{m} {min(v)}–{max(v)}" for m, v in ratios.items())
        return [
            f"{len(pts)} decayed points (one per WSD decay branch) — the data behind the fit. "
            f"Tokens per parameter by size: {span}.",
            noise_sentence(r),
            table(
                "model|seed|N|D|D/N|C (FLOPs)|loss|bpb",
                [{**asdict(p), "ratio": p.D / p.N} for p in pts],
                "model seed N D ratio C loss bpb",
            ),
            *images(r.plots, "ladder"),
        ]


def family(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The proxies' μP base width, head size and lr schedule (what the planned run keeps)."""
    cfg = next((t["config"] for t in finished(trials)), {})
    model = cfg.get("model") or {}
    return {
        **{k: int(model.get(k) or 0) for k in ("dim_model_base", "d_head")},
        "schedule": dict(cfg.get("schedule") or {}),
    }


def proxy_family(ctx: Context) -> dict[str, Any]:
    """``family`` of the finished ladder (empty when unknown)."""
    r = ctx.result(STAGE)
    if r is None:
        return {}
    return {"dim_model_base": r.dim_model_base, "d_head": r.d_head, "schedule": r.schedule}


def noise_sentence(r: LadderResult) -> str:
    """The noise floor, measured or not: what every error in the report is read against."""
    if r.noise_dof:
        return (
            f"Noise floor: runs that differ only in seed (init and data order) differ by "
            f"±{r.noise_sd:.2%} (pooled s.d. of log target, {r.noise_dof} degrees of freedom); "
            "an error below this is noise, not a miss."
        )
    return (
        "Noise floor: not measured (one seed per size): the report cannot tell a small error "
        "from seed noise; set tunnel.ladder.seeds=2 or more to measure it."
    )


STAGE = Ladder()


def points(ctx: Context) -> pd.DataFrame:
    """The ladder's points as a table (the fit's and back-test's input)."""
    ladder = ctx.result(STAGE)
    if ladder is None or not ladder.points:
        raise TunnelError("the fit needs the ladder's points: run the ladder stage first")
    return pd.DataFrame([asdict(p) for p in ladder.points], columns=POINT_COLUMNS)
