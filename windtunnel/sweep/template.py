"""The run config of every trial of a sweep, composed once, in the driver (Hydra runs there only)."""

from __future__ import annotations

import itertools

from windtunnel.compose import as_override, compose_run, config_groups
from windtunnel.sweep.spec import SweepSpec
from windtunnel.sweep.trial import TrialTemplate


def trial_template(spec: SweepSpec) -> TrialTemplate:
    """Compose, once, the base run of every trial (one per choice of config-group parameters,
    e.g. each ``model`` of a ladder): workers then only set fields, never compose."""
    s, group_names = spec.sweep, set(config_groups())
    keys = {k: p.key or k for k, p in s.space.items()}
    groups = tuple(k for k in s.space if keys[k] in group_names)
    for g in groups:
        if s.space[g].kind != "categorical":
            raise ValueError(
                f"sweep.space.{g} picks the config group {keys[g]}: make it categorical"
            )
    options = [list(dict.fromkeys([*s.space[g].choices, *s.space[g].grid])) for g in groups]
    for name, p in s.space.items():
        if p.set and name not in groups:
            raise ValueError(
                f"sweep.space.{name}.set: per-choice run overrides need a parameter that picks "
                f"a config group ({', '.join(sorted(group_names))})"
            )
        unknown = sorted(set(p.set) - {str(c) for c in [*p.choices, *p.grid]})
        if unknown:
            raise ValueError(f"sweep.space.{name}.set names {unknown}, not among its choices")
    configs = {
        combo: compose_run(
            [
                *spec.run,
                *(as_override(keys[g], v) for g, v in zip(groups, combo)),
                *(o for g, v in zip(groups, combo) for o in s.space[g].set.get(str(v), [])),
            ]
        )
        for combo in itertools.product(*options)
    }
    return TrialTemplate(
        sweep=s.name,
        stage=s.stage,
        runs_dir=str((spec.folder / "runs").resolve()),
        keys=keys,
        groups=groups,
        configs=configs,
    )
