"""Resources per trial: which ``sweep.resources`` rule a trial's model falls under, and the
launcher options, run overrides and number of ranks that gives it (pure: configs in, configs
out). The driver keeps one launcher per rule in use; the tunnel's dry run counts with the same
functions, so what it shows is what runs."""

from __future__ import annotations

from windtunnel import flops
from windtunnel.compose import parse_dotlist
from windtunnel.config import RunConfig, flatten, model_shape, resolve_model, with_values
from windtunnel.launch.options import (
    LauncherOptions,
    SlurmOptions,
    launcher_options,
    with_ranks,
)
from windtunnel.sweep.spec import ResourceRule


def model_params(cfg: RunConfig) -> int:
    """Non-embedding parameters of the run's model (what ``max_params`` is compared with)."""
    return flops.non_embedding_params(model_shape(resolve_model(cfg.model, cfg.data.vocab_size)))


def rule_index(rules: list[ResourceRule], n_params: int) -> int | None:
    """The first rule covering a model of ``n_params`` (None: no rule, the sweep's launcher)."""
    for i, rule in enumerate(rules):
        if not rule.max_params or n_params <= rule.max_params:
            return i
    return None


def apply_rule(cfg: RunConfig, rule: ResourceRule | None) -> RunConfig:
    """The trial's run config with the rule's run overrides (``train.nproc_per_node=2``)."""
    if rule is None or not rule.run:
        return cfg
    return with_values(cfg, flatten(parse_dotlist(rule.run)))


def rule_launcher(base: LauncherOptions, rule: ResourceRule | None) -> LauncherOptions:
    """The sweep's launcher options with the rule's on top."""
    return base if rule is None or not rule.launcher else launcher_options(base, **rule.launcher)


def ranks(opts: LauncherOptions, cfg: RunConfig) -> int:
    """Ranks (GPUs on a GPU machine) one trial spans: the SLURM job's nodes × tasks per node
    (:attr:`SlurmOptions.world_size`), else ``train.nproc_per_node``."""
    if isinstance(opts, SlurmOptions):
        return with_ranks(opts, cfg.train.nproc_per_node).world_size  # type: ignore[attr-defined]
    return cfg.train.nproc_per_node


def trial_flops(cfg: RunConfig) -> float:
    """Training FLOPs of a trial's run: the trunk to its last branch point plus every decay
    branch (what the dry run counts, and what orders a grid longest first)."""
    from windtunnel.config import resolve
    from windtunnel.estimate import trained_tokens

    res = resolve(cfg, cfg.data.vocab_size)
    return float(trained_tokens(res) * res.flops_per_token)
