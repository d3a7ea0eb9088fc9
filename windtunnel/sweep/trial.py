"""One trial, as it runs inside a launcher's job (a local process, a SLURM task, a Ray worker).

The worker composes the trial's run config, trains it, reports each intermediate evaluation of
the objective to the Optuna study (from the worker itself: the journal storage is safe for
concurrent writers) and stops when the pruner says so. The driver, not the worker, tells the
study the final state, so a job that dies leaves its trial RUNNING for the driver to retry or
fail with the reason. A retried trial reuses its run folder: it resumes from its checkpoint and
continues the same MLflow run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class TrialSpec:
    """Everything a worker needs; picklable."""

    storage: str
    """Optuna storage URL, or ``journal:<path>`` for the journal file."""
    study: str
    trial_id: int
    number: int
    overrides: list[str]
    objective: str
    n_warmup_evals: int = 1
    conf_dir: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    pruner: Any = None
    """The sweep's :class:`~windtunnel.sweep.spec.SweepConfig` pruner is rebuilt from this:
    Optuna keeps no pruner in its storage, so a worker must be given it."""


def open_storage(url: str) -> Any:
    """``journal:<path>`` → Optuna's journal file storage; anything else → RDB storage."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.RDBStorage(url)


def run_trial(spec: TrialSpec) -> dict[str, Any]:
    """Train one trial; returns ``{status, value, run_id, failure, ...}`` for the driver."""
    import os

    import optuna

    from windtunnel.cli import compose
    from windtunnel.engine import Pruned
    from windtunnel.train import train

    if spec.conf_dir:
        os.environ.setdefault("WINDTUNNEL_CONF", spec.conf_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from windtunnel.sweep.spec import make_pruner

    study = optuna.load_study(
        study_name=spec.study, storage=open_storage(spec.storage), pruner=make_pruner(spec.pruner)
    )
    trial = optuna.Trial(study, spec.trial_id)
    reported: list[int] = []

    def on_eval(tokens: int, metrics: dict[str, float]) -> None:
        value = metrics.get(spec.objective, math.nan)
        if not math.isfinite(value):
            return
        if tokens not in trial.storage.get_trial(spec.trial_id).intermediate_values:
            trial.report(value, step=tokens)
        reported.append(tokens)
        if len(reported) >= spec.n_warmup_evals and trial.should_prune():
            raise Pruned(f"{spec.objective}={value:.4f} at {tokens} tokens")

    cfg = compose(spec.overrides)
    cfg.tags = {**cfg.tags, **spec.tags}
    result = train(cfg, on_eval=on_eval, handle_signals=False)
    value = _objective(result, spec.objective)
    return {
        "status": result.status,
        "value": value,
        "run_id": result.run_id,
        "failure": result.failure,
        "tokens": result.tokens,
        "flops": result.flops,
        "N": result.N,
    }


def _objective(result: Any, key: str) -> float:
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
