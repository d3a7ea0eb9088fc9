"""Sweep specs: typed, Hydra-composed from ``sweeps/<name>.yaml`` plus command-line overrides.

A spec file has three parts::

    defaults: [{launcher: local}, _self_]   # conf/launcher/*.yaml: inline, local, slurm, ray
    sweep:    {name, objective, direction, n_trials, parallelism, sampler, pruner, space, ...}
    run:      [model=micro_xs, train.tokens_per_param=20, ...]   # the base run (Hydra overrides)

Each trial's run config is ``conf/config.yaml`` composed with ``run`` plus the trial's sampled
values as overrides (``optim.lr=0.0071``): the same path as ``windtunnel train``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from windtunnel.launch.options import launcher_options

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
ENGINES = ("optuna", "ray")
PARAM_KINDS = ("float", "int", "categorical")


@dataclass(kw_only=True)
class ParamConfig:
    """One dimension of the search space (named by its key in ``sweep.space``)."""

    key: str = ""
    """Run-config key it sets (``optim.lr``); empty: the name itself. Short names keep
    command-line overrides possible: ``sweep.space.lr.high=0.1``."""
    kind: str = "float"
    """``float``, ``int`` or ``categorical``."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample on a log scale (float/int)."""
    step: float | None = None
    """Quantization step (float/int)."""
    choices: list[Any] = field(default_factory=list)
    """Values of a categorical parameter."""
    grid: list[Any] = field(default_factory=list)
    """Values tried by the grid sampler (defaults to ``choices``)."""
    set: dict[str, list[str]] = field(default_factory=dict)
    """Run overrides of the trials that take a choice, for a parameter that picks a config
    group: e.g. a ladder's token range per size, the small rungs taken far out
    (``{micro_xxs: ["train.branch_tokens_per_param=[10,40,160]"]}``)."""


@dataclass(kw_only=True)
class SamplerConfig:
    kind: str = "tpe"
    """``tpe``, ``random``, ``grid`` or ``cmaes``."""
    seed: int = 0
    n_startup_trials: int = 4
    """Random trials before TPE/CMA-ES model the space."""


@dataclass(kw_only=True)
class PrunerConfig:
    kind: str = "median"
    """``median``, ``successive_halving``, ``hyperband`` or ``none``."""
    n_startup_trials: int = 3
    """Median: trials that finish before pruning starts."""
    n_warmup_evals: int = 1
    """Median: evaluations of a trial before it can be pruned."""
    min_resource: int = 1
    """Successive halving / Hyperband: evaluations before the first rung."""
    reduction_factor: int = 3


@dataclass(kw_only=True)
class ResourceRule:
    """How the trials of models up to ``max_params`` run; a trial takes the first rule that
    matches its model (rules in increasing ``max_params``; the last may leave it 0: any size).

    Tiny proxies pack several trials per job (``launcher: {trials_per_job: 8}``); large rungs
    span GPUs and nodes (``launcher: {nodes: 2, gpus_per_node: 8}`` on SLURM, or
    ``run: [train.nproc_per_node=8]`` on one machine) and may shard (``train.parallel=fsdp``).
    """

    max_params: float = 0
    """Largest non-embedding parameter count this rule covers (0: any)."""
    launcher: dict[str, Any] = field(default_factory=dict)
    """Launcher options of these trials, over the sweep's (``trials_per_job``, ``nodes``, ...)."""
    run: list[str] = field(default_factory=list)
    """Run overrides of these trials (``train.nproc_per_node=2``, ``train.parallel=fsdp``)."""


@dataclass(kw_only=True)
class SweepConfig:
    """What to search, how, and where the study lives."""

    name: str = "sweep"
    """Study name; rerunning the same name resumes the study."""
    stage: str = "sweep"
    """Wind-tunnel stage (tag of every trial run)."""
    engine: str = "optuna"
    """``optuna`` (ask/tell driver over a launcher) or ``ray`` (Ray Tune)."""
    objective: str = "val_bpb"
    """Metric of the finished (decayed) model to optimize: ``val_bpb``, ``val_loss``, or a
    per-domain key such as ``val_bpb/english``."""
    direction: str = "minimize"
    n_trials: int = 16
    parallelism: int = 2
    """Trials running at once."""
    max_retries: int = 1
    """Resubmissions of a trial whose job died (it resumes from its checkpoint)."""
    storage: str = ""
    """Optuna storage: empty for a journal file in the sweep folder, or an RDB URL."""
    dir: str = ".windtunnel/sweeps"
    """Parent folder of sweep folders."""
    threads_per_trial: int = 0
    """torch threads per trial (0: cores / parallelism for local launchers)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    space: dict[str, ParamConfig] = field(default_factory=dict)
    """Parameter name → its range and the run-config key it sets."""
    resources: list[ResourceRule] = field(default_factory=list)
    """Resources per model size (empty: every trial as the launcher says)."""

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """Sampled values → Hydra overrides of the base run."""
        from windtunnel.compose import as_override

        return [as_override(self.space[k].key or k, v) for k, v in params.items()]


@dataclass(kw_only=True)
class SweepSpec:
    """A whole spec: the sweep, the launcher and the base run overrides."""

    sweep: SweepConfig = field(default_factory=SweepConfig)
    launcher: Any = field(default_factory=lambda: {"name": "local"})
    """`LauncherOptions` of the chosen backend; composed by Hydra as a plain dict, typed here."""
    run: list[str] = field(default_factory=list)
    version: int = 1
    """The spec layout's version (:data:`windtunnel.compose.SPEC_VERSION`); may be left out."""

    def __post_init__(self) -> None:
        self.launcher = launcher_options(self.launcher)

    @property
    def folder(self) -> Path:
        return Path(self.sweep.dir) / self.sweep.name

    def validate(self) -> None:
        s, problems = self.sweep, []
        if s.engine not in ENGINES:
            problems.append(f"sweep.engine={s.engine!r}: choose one of {', '.join(ENGINES)}")
        if s.direction not in ("minimize", "maximize"):
            problems.append(f"sweep.direction={s.direction!r}: minimize or maximize")
        if s.sampler.kind not in SAMPLERS:
            problems.append(
                f"sweep.sampler.kind={s.sampler.kind!r}: choose one of {', '.join(SAMPLERS)}"
            )
        if s.pruner.kind not in PRUNERS:
            problems.append(
                f"sweep.pruner.kind={s.pruner.kind!r}: choose one of {', '.join(PRUNERS)}"
            )
        if s.n_trials < 1 or s.parallelism < 1 or s.max_retries < 0:
            problems.append(
                "sweep.n_trials and sweep.parallelism must be ≥ 1, sweep.max_retries ≥ 0"
            )
        if not s.space:
            problems.append("sweep.space is empty: give at least one parameter, e.g. optim.lr")
        for key, p in s.space.items():
            problems += [f"sweep.space.{key}: {m}" for m in _param_problems(p, s.sampler.kind)]
        problems += _resource_problems(self)
        if problems:
            raise ValueError("invalid sweep spec: " + "; ".join(problems))


def _resource_problems(spec: SweepSpec) -> list[str]:
    from windtunnel.compose import parse_dotlist

    rules, out = spec.sweep.resources, []
    bounds = [r.max_params for r in rules]
    if any(b < 0 for b in bounds) or bounds != sorted(bounds, key=lambda b: b or math.inf):
        out.append(
            f"sweep.resources: max_params must be >= 0 and increasing, 0 (any size) last "
            f"(got {bounds})"
        )
    for i, r in enumerate(rules):
        try:
            launcher_options(spec.launcher, **r.launcher)
            parse_dotlist(r.run)
        except ValueError as e:
            out.append(f"sweep.resources[{i}]: {e}")
    return out


def _param_problems(p: ParamConfig, sampler: str) -> list[str]:
    if p.kind not in PARAM_KINDS:
        return [f"kind={p.kind!r}: choose one of {', '.join(PARAM_KINDS)}"]
    if p.kind == "categorical":
        return [] if p.choices else ["a categorical parameter needs choices"]
    out = []
    if p.low is None or p.high is None or not p.low < p.high:
        out.append(f"needs low < high (got {p.low}, {p.high})")
    elif p.log and p.low <= 0:
        out.append("log scale needs low > 0")
    if sampler == "grid" and not p.grid:
        out.append("the grid sampler needs grid: [values] for numeric parameters")
    return out


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Compose a sweep spec file with overrides.

    Overrides of the spec itself (``sweep.n_trials=64``, ``launcher=slurm``,
    ``launcher.partition=gpu``) apply to the spec; every other override (``model=micro_s``,
    ``tracker=jsonl``) is appended to the base run of every trial.
    """
    from windtunnel.compose import compose_spec, find_spec, split_overrides

    own, to_run = split_overrides(overrides, ("sweep", "launcher", "hydra"))
    spec = compose_spec(
        find_spec(path, "sweeps"), SweepSpec, own, schema_name="sweep_schema", what="sweep spec"
    )
    spec.run = [*spec.run, *to_run]
    spec.validate()
    return spec


# -- Optuna objects from the spec (pure apart from Optuna's own constructors) ------------------


def distributions(space: dict[str, ParamConfig], grid: bool = False) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for key, p in space.items():
        if grid:
            out[key] = d.CategoricalDistribution(list(p.grid or p.choices))
        elif p.kind == "categorical":
            out[key] = d.CategoricalDistribution(list(p.choices))
        elif p.kind == "int":
            out[key] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = d.FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)
    return out


def make_sampler(s: SweepConfig, seed_offset: int = 0) -> Any:
    import optuna

    k, seed = s.sampler.kind, s.sampler.seed + seed_offset
    if k == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.sampler.n_startup_trials, constant_liar=True
        )
    if k == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if k == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.sampler.n_startup_trials)
    # grid: the driver enqueues every grid point; the sampler only fills in nothing
    return optuna.samplers.RandomSampler(seed=seed)


def grid_points(space: dict[str, ParamConfig]) -> list[dict[str, Any]]:
    """Every combination of the grid values, in a fixed order."""
    import itertools

    names = list(space)
    values = [list(space[n].grid or space[n].choices) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def make_pruner(s: SweepConfig | PrunerConfig) -> Any:
    import optuna

    p = s if isinstance(s, PrunerConfig) else s.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=0, n_min_trials=1
        )
    if p.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    return optuna.pruners.NopPruner()


def grid_size(space: dict[str, ParamConfig]) -> int:
    return math.prod(len(p.grid or p.choices) for p in space.values())


def to_plain(spec: SweepSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)
