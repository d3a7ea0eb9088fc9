"""One trial, as it runs inside a launcher's job (a local process, a SLURM task, a Ray actor).

The driver composes, once, the run config of every trial (:class:`TrialTemplate`: Hydra runs in
the driver only); a trial's config is that template with its sampled values set
(:func:`~windtunnel.config.with_values`), so workers never import Hydra. One body,
:func:`run_trial`, trains it and hands every intermediate value of the objective to a
``report`` callback; each engine brings its own:

* the Optuna driver (:class:`OptunaTrial`): the worker reports to the study itself (the journal
  storage is safe for concurrent writers) and stops when the pruner says so (a trial of several
  ranks: rank 0 alone reports and asks, and every rank stops); the driver, not the worker, tells
  the study the final state from the job's result (rank 0's), so a job that dies leaves its
  trial RUNNING for the driver to retry or fail with the reason. A retried trial reuses its run folder: it resumes
  from its checkpoint and continues the same MLflow run;
* the Ray Tune engine (``windtunnel.sweep.ray_tune``): the callback is ``tune.report``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from windtunnel.config import RunConfig, with_values

Report = Callable[[int, float], None]
"""``report(tokens, value)`` for every finite intermediate value of the objective; it raises
:class:`~windtunnel.engine.Pruned` (or ``Preempted``) to stop the trial at that evaluation."""


def trial_name(sweep: str, number: int) -> str:
    """Trial ``number``'s run name and run folder name (``<sweep>-t0007``)."""
    return f"{sweep}-t{number:04d}"


def trial_number(name: str) -> int:
    """The inverse of :func:`trial_name`."""
    return int(name.rsplit("-t", 1)[1])


def trial_tags(study: str, number: int) -> dict[str, str]:
    return {"wt.sweep": study, "optuna.study": study, "optuna.trial": str(number)}


@dataclass(kw_only=True)
class TrialTemplate:
    """The run config of every trial of one sweep, composed in the driver; picklable.

    Space parameters whose key names a config group (``model``) pick one of the composed
    ``configs``; every other parameter sets a field (``optim.lr``).
    """

    sweep: str
    stage: str
    runs_dir: str
    """Absolute folder of the trials' run folders."""
    keys: dict[str, str]
    """Space parameter → the run-config key it sets."""
    groups: tuple[str, ...] = ()
    """Space parameters that choose a config group, in the order of ``configs``' keys."""
    configs: dict[tuple[Any, ...], RunConfig] = field(default_factory=dict)
    """Group choices → the composed base run."""

    @property
    def base(self) -> RunConfig:
        return next(iter(self.configs.values()))

    def config(
        self,
        number: int,
        params: Mapping[str, Any],
        *,
        parent_run_id: str | None = None,
        threads: int = 0,
    ) -> RunConfig:
        """Trial ``number``'s run config: the base run, its name and folder, the sampled values."""
        choice = tuple(params[g] for g in self.groups)
        if choice not in self.configs:
            raise ValueError(f"{dict(zip(self.groups, choice))} is not among the composed choices")
        values: dict[str, Any] = {
            "name": trial_name(self.sweep, number),
            "stage": self.stage,
            "run_dir": self.runs_dir,
            "train.progress": False,
            **({"train.threads": threads} if threads else {}),
            **({"tracker.parent_run_id": parent_run_id} if parent_run_id else {}),
            **{self.keys[k]: v for k, v in params.items() if k not in self.groups},
        }
        cfg = with_values(self.configs[choice], values)
        return dataclasses.replace(cfg, tags={**cfg.tags, **trial_tags(self.sweep, number)})

    def run_dir(self, number: int) -> Path:
        return Path(self.runs_dir) / trial_name(self.sweep, number)


@dataclass(kw_only=True)
class TrialSpec:
    """What one trial trains and which metric it is judged by."""

    config: RunConfig
    objective: str


@dataclass
class TrialResult:
    """What a trial sends back to its engine."""

    status: str
    """The trainer's: ``finished``, ``diverged``, ``pruned``, ``preempted``."""
    value: float
    """The objective of the finished (decayed) model; NaN unless finished."""
    run_id: str = ""
    failure: str | None = None
    tokens: int = 0
    flops: float = 0.0
    N: int = 0


def run_trial(spec: TrialSpec, report: Report) -> TrialResult:
    """Train one trial, reporting each finite intermediate value of the objective."""
    from windtunnel.train import train

    def on_eval(tokens: int, metrics: dict[str, float]) -> None:
        value = metrics.get(spec.objective, math.nan)
        if math.isfinite(value):
            report(tokens, float(value))

    result = train(spec.config, on_eval=on_eval, handle_signals=False)
    return TrialResult(
        status=result.status,
        value=objective_value(result, spec.objective),
        run_id=result.run_id,
        failure=result.failure,
        tokens=result.tokens,
        flops=result.flops,
        N=result.N,
    )


def objective_value(result: Any, key: str) -> float:
    """``val_bpb``, ``val_loss`` or ``val_bpb/<domain>`` of a finished run (NaN otherwise)."""
    if result.status != "finished":
        return math.nan
    if key in ("val_bpb", "val_loss"):
        return float(getattr(result, key))
    metric, _, domain = key.partition("/")
    last = result.points[-1]
    field_ = {"val_bpb": "bpb", "val_loss": "loss"}.get(metric)
    if field_ is None or domain not in last.domains:
        raise ValueError(
            f"unknown objective {key!r}: use val_bpb, val_loss or val_bpb/<domain> "
            f"with a domain among {sorted(last.domains)}"
        )
    return float(last.domains[domain][field_])


# -- the Optuna engine's worker side --------------------------------------------------------------


def open_storage(url: str) -> Any:
    """``journal:<path>`` → Optuna's journal file storage; anything else → RDB storage."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.RDBStorage(url)


@dataclass(kw_only=True)
class OptunaTrial:
    """A trial of the Optuna driver as a picklable call: ``launcher.submit(job)``."""

    spec: TrialSpec
    storage: str
    """Optuna storage URL, or ``journal:<path>`` for the journal file."""
    study: str
    trial_id: int
    number: int
    n_warmup_evals: int = 1
    pruner: Any = None
    """The sweep's :class:`~windtunnel.sweep.spec.PrunerConfig`: Optuna keeps no pruner in its
    storage, so a worker must be given it."""

    def __call__(self) -> TrialResult:
        import optuna

        from windtunnel.distributed import world_from_env
        from windtunnel.engine import Pruned
        from windtunnel.launch.ranks import call_on_ranks, under_launcher
        from windtunnel.sweep.spec import make_pruner

        nproc = self.spec.config.train.nproc_per_node
        if nproc > 1 and not under_launcher():  # this trial spans ranks of this machine
            return call_on_ranks(nproc, self)
        if not world_from_env().main:  # one rank of several: rank 0 alone talks to the study
            return run_trial(self.spec, _never_called)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(
            study_name=self.study,
            storage=open_storage(self.storage),
            pruner=make_pruner(self.pruner),
        )
        trial = optuna.Trial(study, self.trial_id)
        reported: list[int] = []

        def report(tokens: int, value: float) -> None:
            if tokens not in trial.storage.get_trial(self.trial_id).intermediate_values:
                trial.report(value, step=tokens)  # a resumed trial does not report twice
            reported.append(tokens)
            if len(reported) >= self.n_warmup_evals and trial.should_prune():
                raise Pruned(f"{self.spec.objective}={value:.4f} at {tokens} tokens")

        return run_trial(self.spec, report)


def _never_called(tokens: int, value: float) -> None:
    """The report of ranks other than 0 (the trainer evaluates the objective on rank 0 only)."""
    raise AssertionError("only rank 0 reports a trial's values")
