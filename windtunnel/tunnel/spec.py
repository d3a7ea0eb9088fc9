"""Tunnel specs: ``tunnels/<name>.yaml``, Hydra-composed with the ``launcher`` group.

A tunnel chains the stages of DESIGN §1 (:mod:`windtunnel.tunnel.stages`), each a sweep spec from
``sweeps/`` (or a pure step); ``tunnel.<stage>`` holds its settings::

    defaults: [tunnel_schema, {launcher: local}, _self_]
    tunnel:
      name: demo
      run: [train.eval_tokens=4096]               # every run of every stage
      mup_search: {sweep: mup_search, set: [sweep.n_trials=8, model=micro_xxs]}
      lr_transfer: {sweep: lr_transfer, lr_factors: [0.25, 0.5, 1, 2, 4]}
      batch_size: {sweep: batch_size}
      ladder: {sweep: ladder}
      fit: {form: chinchilla, target: bpb}
      plan: {budget_flops: 1e21, gpu: h100}
      skip: [batch_size]                          # or <stage>.enabled=false

``windtunnel tunnel demo`` loads ``tunnels/demo.yaml``; ``tunnel.*`` and
``launcher*`` overrides go to the spec, every other override to every run of every stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from windtunnel.launch.options import launcher_options
from windtunnel.sweep.spec import ResourceRule


@dataclass(kw_only=True)
class SweepStage:
    """A stage that runs a sweep spec from ``sweeps/``."""

    enabled: bool = True
    sweep: str = ""
    """Sweep spec name (``sweeps/<name>.yaml``) or path."""
    set: list[str] = field(default_factory=list)
    """Overrides of that sweep spec (``sweep.n_trials=8``) and of its runs (``model=micro_s``)."""
    lr_factors: list[float] = field(default_factory=list)
    """lr_transfer only: lr grid as multiples of the μP search's best lr (empty: the spec's)."""
    seeds: int = 1
    """ladder and verify: train every size (the planned run) this many times (seeds 0…k−1:
    different init and data
    order); the repeats measure the noise floor that every error is read against."""
    resources: list[ResourceRule] = field(default_factory=list)
    """Resources per model size of this stage's trials (see ``sweep.resources``): e.g. pack
    the small rungs 8 per job, give the large ones 8 GPUs each."""


@dataclass(kw_only=True)
class FitStage:
    enabled: bool = True
    form: str = "chinchilla"
    """``chinchilla`` (L = E + A/N^α + B/D^β) or ``minicpm``."""
    target: str = "bpb"
    """``bpb`` (bits per byte: comparable across tokenizers) or ``loss``."""
    bootstrap: int = 200
    """Bootstrap refits for the intervals."""
    seed: int = 0
    extra_budgets: list[float] = field(default_factory=list)
    """Budgets (FLOPs) to show the compute-optimal allocation at besides the plan's, each
    with its interval and extrapolation factor (e.g. the 1e21 a CPU tunnel cannot verify)."""


@dataclass(kw_only=True)
class PlanStage:
    enabled: bool = True
    budget_flops: float = 1e21
    """Compute budget of the full run (FLOPs)."""
    params: float = 0
    """Plan this model size instead of the compute-optimal one (with ``tokens``: both fixed)."""
    tokens: float = 0
    """Plan this many tokens instead of the compute-optimal count."""
    gpu: str = "h100"
    mfu: float = 0.4
    seq_len: int = 4096
    vocab_size: int = 122_753
    batch_tokens: float = 0
    """Tokens per optimizer step of the planned run (0: from the batch-size law)."""
    proxy_mfu: float = 0.2
    """MFU assumed for the proxies' GPU-hours in ``--dry-run`` (measured on an H100: 9M proxy 22%
    compiled, 0.5B 49%; docs/benchmarks.md)."""


BACKTEST_MODES = ("rollout", "largest", "each")
"""``windtunnel.scaling.backtest.MODES`` (not imported here: it would load the fitter)."""


@dataclass(kw_only=True)
class BacktestStage:
    enabled: bool = True
    target_error: float = 0.01
    """Relative error the back-test should stay under (reported, not enforced)."""
    mode: str = "rollout"
    """``rollout`` (fit the k ≥ 3 smallest sizes, predict every larger one, for every k; a
    ladder of 3 sizes falls back to ``largest``), ``largest`` or ``each`` (leave each size out)."""
    level: float = 0.9
    """Mass of each held-out point's prediction interval (the coverage is read against it)."""


@dataclass(kw_only=True)
class TunnelConfig:
    name: str = "tunnel"
    """Tunnel name: its folder, MLflow experiments ``<name>/<stage>`` and the report's title."""
    dir: str = ".windtunnel/tunnels"
    """Parent folder of tunnel folders."""
    description: str = ""
    run: list[str] = field(default_factory=list)
    """Run overrides applied to every run of every stage."""
    mup_search: SweepStage = field(default_factory=lambda: SweepStage(sweep="mup_search"))
    lr_transfer: SweepStage = field(default_factory=lambda: SweepStage(sweep="lr_transfer"))
    batch_size: SweepStage = field(default_factory=lambda: SweepStage(sweep="batch_size"))
    ladder: SweepStage = field(default_factory=lambda: SweepStage(sweep="ladder"))
    fit: FitStage = field(default_factory=FitStage)
    plan: PlanStage = field(default_factory=PlanStage)
    backtest: BacktestStage = field(default_factory=BacktestStage)
    verify: SweepStage = field(default_factory=lambda: SweepStage(sweep="verify", enabled=False))
    """Train the planned run and compare its loss with the prediction (a forward check); off
    unless enabled, since the planned run is the full run at paper scale."""
    skip: list[str] = field(default_factory=list)
    """Stages not to run (same as ``<stage>.enabled=false``)."""


@dataclass(kw_only=True)
class TunnelSpec:
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    launcher: Any = field(default_factory=lambda: {"name": "local"})
    """`LauncherOptions` of the chosen backend; composed by Hydra as a plain dict, typed here."""
    run: list[str] = field(default_factory=list)
    """Command-line run overrides (appended after ``tunnel.run``)."""
    version: int = 1
    """The spec layout's version (:data:`windtunnel.compose.SPEC_VERSION`); may be left out."""

    def __post_init__(self) -> None:
        self.launcher = launcher_options(self.launcher)

    @property
    def folder(self) -> Path:
        return Path(self.tunnel.dir) / self.tunnel.name

    def enabled(self, stage: str) -> bool:
        return stage not in self.tunnel.skip and getattr(self.tunnel, stage).enabled

    def validate(self) -> None:
        t, problems = self.tunnel, []
        NAMES = stage_names()
        unknown = [s for s in t.skip if s not in NAMES]
        if unknown:
            problems.append(f"tunnel.skip has unknown stage(s) {unknown}: stages are {NAMES}")
        if not t.name or "/" in t.name:
            problems.append(f"tunnel.name={t.name!r}: a non-empty name without '/'")
        for s in NAMES:
            st = getattr(t, s)
            if isinstance(st, SweepStage) and self.enabled(s) and not st.sweep:
                problems.append(f"tunnel.{s}.sweep is empty: name a spec in sweeps/")
        if t.fit.form not in ("chinchilla", "minicpm"):
            problems.append(f"tunnel.fit.form={t.fit.form!r}: chinchilla or minicpm")
        if t.fit.target not in ("bpb", "loss"):
            problems.append(f"tunnel.fit.target={t.fit.target!r}: bpb or loss")
        if not 0 < t.plan.mfu <= 1 or not 0 < t.plan.proxy_mfu <= 1:
            problems.append("tunnel.plan.mfu and tunnel.plan.proxy_mfu must be in (0, 1]")
        if t.backtest.mode not in BACKTEST_MODES:
            problems.append(
                f"tunnel.backtest.mode={t.backtest.mode!r}: {', '.join(BACKTEST_MODES)}"
            )
        if not 0 < t.backtest.level < 1:
            problems.append(f"tunnel.backtest.level={t.backtest.level}: in (0, 1), e.g. 0.9")
        for s in ("ladder", "verify"):
            k = getattr(t, s).seeds
            if not 1 <= k <= 16:
                problems.append(f"tunnel.{s}.seeds={k}: 1 to 16 runs (seeds)")
        if (
            not t.plan.budget_flops > 0
            or min(t.plan.batch_tokens, t.plan.params, t.plan.tokens) < 0
        ):
            problems.append(
                "tunnel.plan.budget_flops must be > 0, and batch_tokens, params and tokens >= 0 "
                "(0: from the laws)"
            )
        if any(not b > 0 for b in t.fit.extra_budgets):
            problems.append(f"tunnel.fit.extra_budgets={t.fit.extra_budgets}: FLOPs, all > 0")
        if any(f <= 0 for f in t.lr_transfer.lr_factors):
            problems.append("tunnel.lr_transfer.lr_factors must be positive")
        if problems:
            raise ValueError("invalid tunnel spec: " + "; ".join(problems))


def stage_names() -> tuple[str, ...]:
    """The stages a tunnel spec has settings for (``tunnel.<stage>``: one per stage module)."""
    return tuple(
        f.name
        for f in dataclasses.fields(TunnelConfig)
        if callable(f.default_factory) and hasattr(f.default_factory(), "enabled")
    )


def load_tunnel(experiment: str | Path, overrides: list[str] | None = None) -> TunnelSpec:
    """Compose ``tunnels/<experiment>.yaml`` (or a path) with command-line overrides."""
    from windtunnel.compose import compose_spec, find_spec, split_overrides

    own, to_run = split_overrides(overrides, ("tunnel", "launcher", "hydra"))
    spec = compose_spec(
        find_spec(experiment, "tunnels"),
        TunnelSpec,
        own,
        schema_name="tunnel_schema",
        what="tunnel",
    )
    spec.run = [*spec.run, *to_run]
    spec.validate()
    return spec
