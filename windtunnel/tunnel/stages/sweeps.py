"""What the sweep stages (μP search, μTransfer, batch size, ladder) share.

Every sweep stage is a sweep spec from ``sweeps/`` run under the tunnel's name, folder and
launcher, with what earlier stages found added to its runs (the μP optimum). Results are read
back from the trial run folders (``result.json``, ``config.json``, ``journal.jsonl``): the tunnel
needs no tracking server to compute anything, and a rerun reads the same files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from windtunnel.compose import split_overrides
from windtunnel.estimate import trained_tokens
from windtunnel.sweep.parent import SweepSummary
from windtunnel.sweep.resources import apply_rule, model_params, ranks, rule_index, rule_launcher
from windtunnel.sweep.spec import SweepSpec, grid_size, load_sweep
from windtunnel.sweep.trial import trial_name
from windtunnel.tunnel.spec import SweepStage, TunnelSpec
from windtunnel.tunnel.stage import Context, Stage, StageEstimate, TunnelError, say

if TYPE_CHECKING:
    import pandas as pd

    from windtunnel.config import RunConfig


@dataclass(kw_only=True)
class TrialRecord:
    """One trial of a stage's study, as ``state.json`` keeps it."""

    number: int
    state: str
    """``COMPLETE``, ``PRUNED``, ``FAIL`` (or ``RUNNING`` while the study runs)."""
    params: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    intermediate: dict[str, float] = field(default_factory=dict)
    """Objective per reported step (the step as a string, as JSON keeps keys)."""
    failure: str | None = None


@dataclass(kw_only=True)
class SweepResult:
    """What every sweep stage keeps: the sweep's summary, its trials and the stage's figures."""

    summary: SweepSummary | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


S = TypeVar("S", bound=SweepResult)


class Sweep(Stage[S]):
    """A stage that runs a sweep spec (``tunnel.<name>: {sweep: ..., set: [...]}``)."""

    settings_type = SweepStage

    def upstream(self, ctx: Context) -> list[str] | None:
        """Run overrides that earlier stages found (None: this sweep takes none)."""
        return None

    def key(self, ctx: Context) -> dict[str, Any]:
        parts = {**super().key(ctx), "run": [*ctx.tf.tunnel.run, *ctx.tf.run]}
        parts["settings"].pop("resources", None)  # where trials run does not change results
        upstream = self.upstream(ctx)
        if upstream is not None:
            parts["upstream"] = upstream
        return parts

    def spec(self, ctx: Context) -> SweepSpec:
        return sweep_spec(ctx.tf, self.name, self.upstream(ctx) or [])

    def sweep(self, ctx: Context, spec: SweepSpec) -> tuple[SweepSummary, list[dict[str, Any]]]:
        """Run (or resume) the sweep; its summary and every trial's full record."""
        from windtunnel.sweep import run_sweep
        from windtunnel.sweep.view import SweepView

        n = spec.sweep.n_trials
        if spec.sweep.sampler.kind == "grid":
            n = min(n, grid_size(spec.sweep.space))
        say(
            f"{self.name}: {n} trials, parallelism {spec.sweep.parallelism}, "
            f"launcher {spec.launcher.name}"
        )
        summary = run_sweep(spec, view=SweepView(n, f"{ctx.tf.tunnel.name}/{self.name}"))
        trials = trial_records(spec)
        if not any(t["state"] == "COMPLETE" for t in trials):
            reasons = "; ".join(f"#{k}: {v}" for k, v in list(summary.failures.items())[:3])
            raise TunnelError(
                f"stage {self.name}: no trial finished ({summary.n_failed} failed"
                f"{': ' + reasons if reasons else ''}); "
                f"fix the cause and rerun — finished trials are kept ({spec.folder})"
            )
        return summary, trials

    def progress(self, folder: Path) -> dict[str, Any]:
        journal = folder / "sweeps" / self.name / "optuna.journal"
        if not journal.is_file():
            return {}
        import optuna

        from windtunnel.sweep.trial import open_storage
        from windtunnel.sweep.view import counts

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.load_study(
                study_name=self.name, storage=open_storage(f"journal:{journal}")
            )
        except KeyError:
            return {}
        return {"trials": counts(study)}

    def estimate_spec(self, tf: TunnelSpec) -> SweepSpec:
        """The sweep the dry run counts (no earlier stage has run)."""
        return sweep_spec(tf, self.name, [])

    def estimate(self, tf: TunnelSpec, peak_flops: float, mfu: float) -> StageEstimate:
        from windtunnel.config import resolve

        spec = self.estimate_spec(tf)
        configs = trial_configs(spec)
        n = len(configs)
        est = StageEstimate(
            stage=self.name, enabled=True, trials=n, parallelism=spec.sweep.parallelism
        )
        rules = spec.sweep.resources
        per_rule: dict[int | None, tuple[int, int]] = {}  # rule → (trials, trials per job)
        for cfg in configs:
            i = rule_index(rules, model_params(cfg)) if rules else None
            rule = None if i is None else rules[i]
            opts, cfg = rule_launcher(spec.launcher, rule), apply_rule(cfg, rule)
            width = ranks(opts, cfg)
            pack = opts.trials_per_job if width == 1 else 1
            per_rule[i] = (per_rule.get(i, (0, pack))[0] + 1, pack)
            res = resolve(cfg, cfg.data.vocab_size)
            tokens = trained_tokens(res)
            flops = float(tokens * res.flops_per_token)
            hours = flops / (peak_flops * mfu) / 3600.0
            est.tokens += tokens
            est.flops += flops
            est.gpu_hours += hours
            est.wall_hours += hours * pack / width / max(1, min(n, spec.sweep.parallelism))
            if width not in est.gpus_per_trial:
                est.gpus_per_trial.append(width)
            if cfg.model.name not in est.models:
                est.models.append(cfg.model.name)
        est.jobs = sum(math.ceil(k / pack) for k, pack in per_rule.values())
        if spec.sweep.sampler.kind != "grid":
            est.note = f"{spec.sweep.sampler.kind} search counted at full budget (pruning saves)"
        return est


def compact(trials: list[dict[str, Any]]) -> list[TrialRecord]:
    """The trial records ``state.json`` keeps (no run folder contents)."""
    return [
        TrialRecord(
            number=t["number"],
            state=t["state"],
            params=t["params"],
            value=t["value"],
            intermediate={str(k): v for k, v in t["intermediate"].items()},
            failure=t["failure"],
        )
        for t in trials
    ]


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A table's rows as dicts (column → value), as results keep them."""
    return cast(list[dict[str, Any]], df.to_dict(orient="records"))


def sweep_spec(tf: TunnelSpec, stage: str, upstream: list[str]) -> SweepSpec:
    """The sweep spec of ``stage``: its file, the tunnel's overrides, launcher and folder."""
    st: SweepStage = getattr(tf.tunnel, stage)
    t = tf.tunnel
    own, run = split_overrides(st.set, ("sweep", "launcher", "hydra"))
    spec = load_sweep(
        st.sweep,
        [
            *(o for o in own if not o.startswith("launcher")),
            f"sweep.name={stage}",
            f"sweep.stage={stage}",
            f"sweep.dir={tf.folder / 'sweeps'}",
        ],
    )
    spec.run = [*spec.run, *t.run, *upstream, *run, *tf.run, f"tracker.experiment={t.name}/{stage}"]
    if spec.sweep.sampler.kind == "grid" and not any(o.startswith("sweep.n_trials") for o in own):
        spec.sweep.n_trials = grid_size(spec.sweep.space)  # the whole grid unless a count is set
    spec.launcher = _stage_launcher(tf, [o for o in own if o.startswith("launcher.")])
    if st.resources:
        spec.sweep.resources = list(st.resources)
    spec.validate()
    return spec


def _stage_launcher(tf: TunnelSpec, overrides: list[str]) -> Any:
    """The tunnel's launcher with a stage's own ``launcher.*`` settings on top (e.g. packing
    ``launcher.trials_per_job=8`` for the 9M search but not for the 0.5B ladder)."""
    from windtunnel.compose import parse_dotlist
    from windtunnel.launch.options import launcher_options

    own = parse_dotlist([o[len("launcher.") :] for o in overrides])
    return launcher_options({**tf.launcher.as_dict(changed_only=True), **own})


# -- reading a finished sweep back ------------------------------------------------------------


def trial_records(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial of the study with its state, params, value, intermediate values, and the
    run folder's result and config where it wrote them."""
    import optuna

    from windtunnel.sweep.driver import FAIL_REASON, storage_url
    from windtunnel.sweep.trial import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec.sweep.name, storage=open_storage(storage_url(spec)))
    out = []
    for t in study.get_trials(deepcopy=False):
        run_dir = spec.folder / "runs" / trial_name(spec.sweep.name, t.number)
        rec: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params),
            "value": t.value,
            "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
            "run_dir": str(run_dir),
            "failure": t.user_attrs.get(FAIL_REASON),
        }
        for name in ("result", "config"):
            f = run_dir / f"{name}.json"
            rec[name] = json.loads(f.read_text()) if f.is_file() else None
        out.append(rec)
    return out


def finished(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete trials that wrote their decay branches."""
    return [t for t in trials if t["state"] == "COMPLETE" and (t["result"] or {}).get("branches")]


# -- the dry run ---------------------------------------------------------------------------------


def trial_configs(spec: SweepSpec) -> list[RunConfig]:
    """The run config of every trial (searched values do not change the budget: the base)."""
    from windtunnel.sweep.spec import grid_points
    from windtunnel.sweep.template import trial_template

    s, template = spec.sweep, trial_template(spec)
    if s.sampler.kind == "grid":
        return [template.config(i, p) for i, p in enumerate(grid_points(s.space)[: s.n_trials])]
    return [template.base] * s.n_trials
