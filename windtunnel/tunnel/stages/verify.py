"""Forward check of the plan: train the planned run and compare its final loss with the law's
prediction and interval (DESIGN §9). At paper scale the planned run is the full run; a CPU
tunnel plans for a budget within its reach so that it can train it (``tunnels/demo.yaml``).

The run is the plan's experiment config: its model, tokens, batch, lr and schedule (the plan
keeps the ladder's schedule and μP settings: the law describes runs trained that way), on the
tunnel's data. Its
loss is compared with the prediction at the (N, D) it actually trained, with the same kind of
interval as every back-test point (parameters, lack of fit, seed noise) at the back-test's level,
so it counts as one more held-out point — the first one the tunnel chose itself.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from windtunnel.compose import as_override
from windtunnel.sweep.spec import SweepSpec
from windtunnel.tunnel.render import Block, loss, pct, size, spct
from windtunnel.tunnel.spec import TunnelSpec
from windtunnel.tunnel.stage import Context, StageEstimate, TunnelError
from windtunnel.tunnel.stages import fit, ladder, plan
from windtunnel.tunnel.stages.mup_search import AfterSearch, best_overrides
from windtunnel.tunnel.stages.sweeps import SweepResult, compact, finished

LEVEL = 0.9
"""Interval mass of the check (the back-test's, so that the verify point reads like one)."""


@dataclass(kw_only=True)
class VerifyResult(SweepResult):
    target: str = "bpb"
    N: float = 0.0
    """Non-embedding parameters of the trained run."""
    D: float = 0.0
    """Tokens it trained (the plan's, rounded to whole optimizer steps)."""
    seeds: list[int] = field(default_factory=list)
    observed: list[float] = field(default_factory=list)
    """Final target of each seed's run (the whole validation split)."""
    predicted: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    level: float = LEVEL
    plan_loss: float = math.nan
    """What the plan predicted at its own (N, D)."""
    extrapolation: float = 0.0
    """6ND over the largest compute the law was fitted on."""
    noise_sd: float = 0.0
    """The ladder's seed noise (0: not measured)."""
    run_ids: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.observed) if self.observed else math.nan

    @property
    def rel_error(self) -> float:
        return self.mean / self.predicted - 1.0

    @property
    def inside(self) -> bool:
        return self.lo <= self.mean <= self.hi


def plan_overrides(p: plan.PlanResult) -> list[str]:
    """The planned run as run overrides: its model (vocabulary from the tunnel's tokenizer),
    sequence length, batch, lr, schedule and tokens; no decay branches (one point, at D)."""
    cfg = p.hydra_config()
    model = {k: v for k, v in cfg["model"].items() if k != "vocab_size"}
    return [
        *(as_override(f"model.{k}", v) for k, v in model.items()),
        "model.vocab_size=0",
        as_override("data.seq_len", cfg["data"]["seq_len"]),
        *(as_override(f"optim.{k}", v) for k, v in cfg["optim"].items()),
        *(as_override(f"schedule.{k}", v) for k, v in cfg["schedule"].items()),
        as_override("train.tokens", int(cfg["train"]["tokens"])),
        "train.branch_tokens=[]",
        "train.branch_tokens_per_param=[]",
    ]


class Verify(AfterSearch[VerifyResult]):
    name = "verify"
    result_type = VerifyResult
    titles = ("Forward check of the plan",)

    def upstream(self, ctx: Context) -> list[str] | None:
        p = ctx.result(plan.STAGE)
        return [*best_overrides(ctx), *(plan_overrides(p) if p is not None else [])]

    def spec(self, ctx: Context) -> SweepSpec:
        return ladder.with_seeds(super().spec(ctx), self.settings(ctx.tf).seeds)

    def run(self, ctx: Context) -> VerifyResult:
        from windtunnel.scaling.intervals import fit_file_interval
        from windtunnel.scaling.plan import load_fit_file

        p, f = ctx.result(plan.STAGE), ctx.result(fit.STAGE)
        if p is None or f is None:
            raise TunnelError("verify trains the planned run: run the fit and plan stages first")
        if p.refused:
            raise TunnelError(
                "the plan was refused (see its warnings): there is no planned run to verify; "
                "change tunnel.plan (budget_flops, batch_tokens) or skip verify"
            )
        target = ctx.tf.tunnel.fit.target
        summary, trials = self.sweep(ctx, self.spec(ctx))
        done = finished(trials)
        if not done:
            raise TunnelError("stage verify: the planned run did not finish; see its trial")
        points = [t["result"]["branches"][-1] for t in done]
        N, D = float(points[0]["N"]), float(points[0]["D"])
        fit_file = load_fit_file(f.fit_file)
        pi = fit_file_interval(fit_file, N, D, level=LEVEL)
        top = ((fit_file.get("data_range") or {}).get("C") or [0.0, 0.0])[1]
        lad = ctx.result(ladder.STAGE)
        return VerifyResult(
            summary=summary,
            trials=compact(trials),
            target=target,
            N=N,
            D=D,
            seeds=[int(t["config"]["train"]["seed"]) for t in done],
            observed=[float(b["val_bpb" if target == "bpb" else "val_loss"]) for b in points],
            predicted=pi.predicted,
            lo=pi.lo,
            hi=pi.hi,
            level=LEVEL,
            plan_loss=p.loss,
            extrapolation=6.0 * N * D / top if top else 0.0,
            noise_sd=lad.noise_sd if lad is not None else 0.0,
            run_ids=[str(b.get("run_id") or "") for b in points],
        )

    def estimate(self, tf: TunnelSpec, peak_flops: float, mfu: float) -> StageEstimate:
        """The planned run is known only after the fit: counted at the plan's budget (6ND when
        the plan fixes both N and D)."""
        p = tf.tunnel.plan
        k = self.settings(tf).seeds
        budget = 6.0 * p.params * p.tokens if p.params and p.tokens else p.budget_flops
        hours = budget / (peak_flops * mfu) / 3600.0
        return StageEstimate(
            stage=self.name,
            enabled=True,
            trials=k,
            jobs=k,
            parallelism=k,
            flops=budget * k,
            gpu_hours=hours * k,
            wall_hours=hours,
            note="the planned run at the plan's budget (its model is chosen after the fit)",
        )

    def headline(self, r: VerifyResult) -> str:
        where = "inside" if r.inside else "OUTSIDE"
        return (
            f"planned run trained ({size(r.N)} params × {size(r.D)} tokens, "
            f"{r.extrapolation:.1f}× the fitted compute): {r.target} {loss(r.mean)} vs predicted "
            f"{loss(r.predicted)} [{loss(r.lo)}, {loss(r.hi)}] — {where} the {r.level:.0%} "
            f"interval, error {spct(r.rel_error)}"
        )

    def metrics(self, r: VerifyResult) -> dict[str, float]:
        return {
            "verify.observed": r.mean,
            "verify.predicted": r.predicted,
            "verify.rel_error": r.rel_error,
            "verify.inside": float(r.inside),
            "verify.extrapolation": r.extrapolation,
        }

    def section(self, r: VerifyResult, title: str) -> list[Block]:
        rows = [
            [str(s), loss(o), spct(o / r.predicted - 1.0), run]
            for s, o, run in zip(r.seeds, r.observed, r.run_ids)
        ]
        noise = (
            f"the ladder's seed noise is ±{pct(r.noise_sd)}"
            if r.noise_sd
            else "the seed noise was not measured (tunnel.ladder.seeds=1)"
        )
        verdict = (
            f"The planned run landed inside its {r.level:.0%} interval"
            if r.inside
            else f"The planned run landed OUTSIDE its {r.level:.0%} interval: the law, its "
            "interval or the plan's transfer of the ladder's settings misses here; look at the "
            "back-test's coverage and the ladder's range before trusting a larger plan"
        )
        return [
            f"The plan's run was trained as planned ({size(r.N)} non-embedding parameters, "
            f"{size(r.D)} tokens, {r.extrapolation:.2g}× the largest compute the law was fitted "
            f"on) and its final {r.target} measured on the whole validation split. The law "
            f"predicts {loss(r.predicted)} at that (N, D), {r.level:.0%} interval "
            f"[{loss(r.lo)}, {loss(r.hi)}] (the plan said {loss(r.plan_loss)} at its own D).",
            ("table", ["seed", f"observed {r.target}", "error vs prediction", "MLflow run"], rows),
            f"{verdict}: error {spct(r.rel_error)}; {noise}.",
        ]


STAGE = Verify()
