"""``windtunnel tunnel --dry-run``: what a tunnel would run and cost, from configs alone.

Every trial's run config is composed and resolved exactly as the sweep would (grid points one by
one; a TPE/random search at its base model, counted at its full budget: pruning only lowers it).
Compute is the trainer's exact FLOP count for what the run trains: the stable trunk up to its
last branch point plus every decay branch. GPU-hours assume ``tunnel.plan.proxy_mfu`` of the
GPU's bf16 peak (tiny proxies fill a GPU poorly; see docs/benchmarks.md for measured MFU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from windtunnel.tunnel.spec import STAGES, SWEEP_STAGES, TunnelSpec


@dataclass
class StageEstimate:
    stage: str
    enabled: bool
    trials: int = 0
    jobs: int = 0
    parallelism: int = 0
    tokens: float = 0.0
    flops: float = 0.0
    gpu_hours: float = 0.0
    models: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class DryRun:
    tunnel: str
    launcher: str
    gpu: str
    proxy_mfu: float
    stages: list[StageEstimate]

    @property
    def totals(self) -> dict[str, float]:
        on = [s for s in self.stages if s.enabled]
        return {
            "trials": sum(s.trials for s in on),
            "jobs": sum(s.jobs for s in on),
            "tokens": sum(s.tokens for s in on),
            "flops": sum(s.flops for s in on),
            "gpu_hours": sum(s.gpu_hours for s in on),
        }

    def table(self) -> str:
        lines = [
            f"tunnel {self.tunnel}: launcher {self.launcher}, GPU-hours at {self.proxy_mfu:.0%} "
            f"MFU of one {self.gpu.upper()} (bf16 peak)",
            f"{'stage':<12}{'trials':>8}{'jobs':>7}{'parallel':>9}{'tokens':>11}{'FLOPs':>11}"
            f"{'GPU-h':>9}  models / note",
        ]
        for s in self.stages:
            if not s.enabled:
                lines.append(f"{s.stage:<12}{'(skipped)':>8}")
                continue
            what = ", ".join(s.models) or s.note
            lines.append(
                f"{s.stage:<12}{s.trials:>8}{s.jobs:>7}{s.parallelism:>9}{s.tokens:>11.3g}"
                f"{s.flops:>11.3g}{s.gpu_hours:>9.1f}  {what}"
            )
        t = self.totals
        lines.append(
            f"{'total':<12}{t['trials']:>8}{t['jobs']:>7}{'':>9}{t['tokens']:>11.3g}"
            f"{t['flops']:>11.3g}{t['gpu_hours']:>9.1f}"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "totals": self.totals, "dry_run": True}


def trained_tokens(res: Any) -> int:
    """Tokens a run trains: the trunk to its last branch point plus every decay branch."""
    tps = res.tokens_per_step
    trunk = max(p.decay_start for p in res.points)
    return tps * (trunk + sum(p.total_steps - p.decay_start for p in res.points))


def _trial_configs(spec: Any) -> list[Any]:
    """The run config of every trial (searched values do not change the budget: the base)."""
    from windtunnel.sweep.spec import grid_points
    from windtunnel.sweep.template import trial_template

    s, template = spec.sweep, trial_template(spec)
    if s.sampler.kind == "grid":
        return [template.config(i, p) for i, p in enumerate(grid_points(s.space)[: s.n_trials])]
    return [template.base] * s.n_trials


def estimate_sweep(tf: TunnelSpec, stage: str, peak: float, mfu: float) -> StageEstimate:
    from windtunnel.config import resolve
    from windtunnel.tunnel.stages import sweep_spec

    spec = sweep_spec(tf, stage, [])
    lr_factors = getattr(tf.tunnel, stage).lr_factors
    if lr_factors:
        from windtunnel.tunnel.stages import lr_grid_overrides

        spec = lr_grid_overrides(spec, 1e-2, lr_factors)  # the grid's size, not its centre
    configs = _trial_configs(spec)
    n = len(configs)
    est = StageEstimate(stage=stage, enabled=True, trials=n, parallelism=spec.sweep.parallelism)
    est.jobs = math.ceil(n / max(1, spec.launcher.trials_per_job))
    for cfg in configs:
        res = resolve(cfg, cfg.data.vocab_size)
        tokens = trained_tokens(res)
        est.tokens += tokens
        est.flops += float(tokens * res.flops_per_token)
        if cfg.model.name not in est.models:
            est.models.append(cfg.model.name)
    est.gpu_hours = est.flops / (peak * mfu) / 3600.0
    if spec.sweep.sampler.kind != "grid":
        est.note = f"{spec.sweep.sampler.kind} search counted at full budget (pruning saves)"
    return est


def dry_run(tf: TunnelSpec) -> DryRun:
    from windtunnel.scaling.plan import GPU_PEAK_BF16

    p = tf.tunnel.plan
    if p.gpu.lower() not in GPU_PEAK_BF16:
        raise ValueError(f"tunnel.plan.gpu={p.gpu!r}: known GPUs {', '.join(GPU_PEAK_BF16)}")
    peak = GPU_PEAK_BF16[p.gpu.lower()]
    stages = []
    for stage in STAGES:
        if not tf.enabled(stage):
            stages.append(StageEstimate(stage=stage, enabled=False))
        elif stage in SWEEP_STAGES:
            stages.append(estimate_sweep(tf, stage, peak, p.proxy_mfu))
        else:
            stages.append(StageEstimate(stage=stage, enabled=True, note="CPU, seconds"))
    return DryRun(
        tunnel=tf.tunnel.name,
        launcher=tf.launcher.name,
        gpu=p.gpu,
        proxy_mfu=p.proxy_mfu,
        stages=stages,
    )
