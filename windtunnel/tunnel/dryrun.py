"""``windtunnel tunnel --dry-run``: what a tunnel would run and cost, from configs alone.

Every trial's run config is composed and resolved exactly as the sweep would (grid points one by
one; a TPE/random search at its base model, counted at its full budget: pruning only lowers it).
Compute is the trainer's exact FLOP count for what the run trains: the stable trunk up to its
last branch point plus every decay branch. GPU-hours assume ``tunnel.plan.proxy_mfu`` of the
GPU's bf16 peak (tiny proxies fill a GPU poorly; see docs/benchmarks.md for measured MFU).
GPUs per trial and jobs follow the stage's resource rules (``resources``: packed trials share
one GPU, spanning trials take nodes × GPUs); wall-clock runs ``parallelism`` trials at a time,
each on its GPUs or its share of a packed one, stages one after another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from windtunnel.tunnel.spec import TunnelSpec
from windtunnel.tunnel.stage import StageEstimate
from windtunnel.tunnel.stages import STAGES

__all__ = ["DryRun", "StageEstimate", "dry_run"]


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
            "wall_hours": sum(s.wall_hours for s in on),
        }

    def table(self) -> str:
        lines = [
            f"tunnel {self.tunnel}: launcher {self.launcher}, GPU-hours at {self.proxy_mfu:.0%} "
            f"MFU of one {self.gpu.upper()} (bf16 peak)",
            f"{'stage':<12}{'trials':>8}{'jobs':>7}{'parallel':>9}{'GPUs/trial':>11}"
            f"{'tokens':>11}{'FLOPs':>11}{'GPU-h':>9}{'wall h':>9}  models / note",
        ]
        for s in self.stages:
            if not s.enabled:
                lines.append(f"{s.stage:<12}{'(skipped)':>8}")
                continue
            what = ", ".join(s.models) or s.note
            gpus = "/".join(str(g) for g in sorted(s.gpus_per_trial)) or "-"
            lines.append(
                f"{s.stage:<12}{s.trials:>8}{s.jobs:>7}{s.parallelism:>9}{gpus:>11}"
                f"{s.tokens:>11.3g}{s.flops:>11.3g}{s.gpu_hours:>9.1f}{s.wall_hours:>9.1f}  {what}"
            )
        t = self.totals
        lines.append(
            f"{'total':<12}{t['trials']:>8}{t['jobs']:>7}{'':>9}{'':>11}{t['tokens']:>11.3g}"
            f"{t['flops']:>11.3g}{t['gpu_hours']:>9.1f}{t['wall_hours']:>9.1f}"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "totals": self.totals, "dry_run": True}


def dry_run(tf: TunnelSpec) -> DryRun:
    from windtunnel.scaling.plan import GPU_PEAK_BF16

    p = tf.tunnel.plan
    if p.gpu.lower() not in GPU_PEAK_BF16:
        raise ValueError(f"tunnel.plan.gpu={p.gpu!r}: known GPUs {', '.join(GPU_PEAK_BF16)}")
    peak = GPU_PEAK_BF16[p.gpu.lower()]
    stages = [
        stage.estimate(tf, peak, p.proxy_mfu)
        if tf.enabled(stage.name)
        else StageEstimate(stage=stage.name, enabled=False)
        for stage in STAGES
    ]
    return DryRun(
        tunnel=tf.tunnel.name,
        launcher=tf.launcher.name,
        gpu=p.gpu,
        proxy_mfu=p.proxy_mfu,
        stages=stages,
    )
