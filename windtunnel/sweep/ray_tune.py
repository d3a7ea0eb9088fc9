"""The Ray Tune engine (``sweep.engine=ray``): a ``Tuner`` with ``OptunaSearch`` and ASHA.

Same spec, same results as the Optuna driver: trial ``n`` trains ``<sweep>-t<NNNN>`` under
``<folder>/runs``, as a nested MLflow run of the sweep's parent run, tagged ``wt.sweep``,
``optuna.study`` and ``optuna.trial``; the best parameters land on the parent.

* **Search**: ``OptunaSearch`` over ``distributions(sweep.space)`` with the spec's (seeded)
  sampler; the grid sampler becomes ``points_to_evaluate``.
* **Pruning**: ASHA, ``time_attr="tokens"``; grace period = ``pruner.min_resource`` (median:
  ``n_warmup_evals``) evaluations of the base run, reduction factor ``pruner.reduction_factor``;
  ``pruner.kind=none`` runs FIFO. Trials report ``{"objective", "tokens"}`` at every evaluation
  of the stable phase; the final, decayed value comes last, without ``tokens`` (ASHA ignores it).
* **Stopped by ASHA**: Ray's stop surfaces as ``SystemExit`` inside ``tune.report``; the trial
  turns it into :class:`~windtunnel.engine.Preempted` (checkpoint, run left open) and the actor
  waits for that (:class:`_FinishOnStop`). Tune also stops trials when the driver is
  interrupted, and those must resume; so only after ``fit()`` are the trials that ASHA stopped
  finished ``KILLED`` with ``wt.pruned=true``, from their run journals (so are the runs of
  trials whose actor died: ``FAILED`` with the reason).
* **Where**: a private local Ray (``address="local"``, ``parallelism × cpus`` CPUs), or the
  cluster at ``launcher.address`` with ``launcher=ray``; Ray already running in this process is
  used as is. Each trial asks for ``launcher.cpus_per_task`` CPUs (default 1) and
  ``gpus_per_task`` GPUs; actors are reused between trials (no process start, no imports).
* **Resume**: Tune's state lives in ``<folder>/ray/<sweep>``; rerunning an unfinished sweep
  restores it (``Tuner.restore``): trials that were running restart and their trainer resumes
  from its run-folder checkpoint and MLflow run. A finished sweep returns its saved summary
  (``<folder>/ray_summary.json``) without starting Ray. Limitation: Ray Tune cannot extend a
  finished experiment, so raising ``sweep.n_trials`` afterwards is refused (use a new name or
  the ``optuna`` engine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from windtunnel import compat
from windtunnel.launch.ray_launcher import RAY_ENV
from windtunnel.sweep.parent import SweepSummary, close_parent, open_parent
from windtunnel.sweep.spec import (
    SweepSpec,
    distributions,
    grid_points,
    grid_size,
    make_sampler,
)
from windtunnel.sweep.template import trial_template
from windtunnel.sweep.trial import (
    TrialSpec,
    TrialTemplate,
    run_trial,
    trial_name,
    trial_number,
)

for _k, _v in RAY_ENV.items():  # before Ray is imported: loopback, no auth token
    os.environ.setdefault(_k, _v)

from ray.tune.schedulers import ASHAScheduler  # noqa: E402

SUMMARY = "ray_summary.json"
STOPPED = "asha_stopped.txt"
"""Trials ASHA stopped (one name a line, in the Tune folder): pruned, not interrupted."""
STOP_WAIT_S = 60.0
"""How long a stopped trial's actor waits for the trial to finish its run."""
UNBOUNDED_T = 10**15
"""ASHA's max_t: trials end at their own budget (which sampled values may change)."""


class TrialFailed(RuntimeError):
    """A trial that diverged (or otherwise did not finish): Tune records it as an error."""


@dataclass
class _Job:
    """What every trial needs (shipped to the workers with ``tune.with_parameters``)."""

    template: TrialTemplate
    objective: str
    parent_run_id: str | None
    threads: int
    cwd: str


class _TrialName:
    """Tune trial name and folder ``<sweep>-t<NNNN>`` (the experiment tag starts at 1)."""

    def __init__(self, sweep: str) -> None:
        self.sweep = sweep

    def __call__(self, trial: Any) -> str:
        return trial_name(self.sweep, int(trial.experiment_tag.split("_")[0]) - 1)


class _Asha(ASHAScheduler):
    """ASHA that records whom it stops: Tune stops trials also when interrupted."""

    def __init__(self, record: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.record = record

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a") as f:
                f.write(f"{trial}\n")
        return action


class _FinishOnStop:
    """Mixin of the function trainable: when Tune stops a trial, wake its thread (``report``
    raises ``SystemExit``) and wait until the trainer has finished its run, then clean up."""

    def _let_trial_finish(self) -> None:
        compat.finish_function_trial(STOP_WAIT_S)

    def cleanup(self) -> None:
        self._let_trial_finish()
        super().cleanup()  # type: ignore[misc]

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._let_trial_finish()  # a reused actor: same as a stop, then the next trial
        return super().reset_config(new_config)  # type: ignore[misc]


def _trainable(config: dict[str, Any], job: _Job) -> None:
    from ray import tune

    from windtunnel.engine import Preempted

    if os.path.isdir(job.cwd):  # Tune runs trials in its own folder: relative paths are ours
        os.chdir(job.cwd)
    number = trial_number(tune.get_context().get_trial_name())
    params = {k: config[k] for k in job.template.keys}
    cfg = job.template.config(number, params, parent_run_id=job.parent_run_id, threads=job.threads)

    def report(tokens: int, value: float) -> None:
        try:
            tune.report({"objective": value, "tokens": int(tokens)})
        except SystemExit:  # Tune stops the trial (ASHA, or the driver is interrupted)
            raise Preempted(f"stopped by Ray Tune at {tokens} tokens") from None

    result = run_trial(TrialSpec(config=cfg, objective=job.objective), report)
    if result.status in ("preempted", "pruned"):
        raise SystemExit(0)  # Tune stopped it (the driver knows why): end as Ray expects
    if result.status != "finished" or not math.isfinite(result.value):
        raise TrialFailed(f"{result.status}: {result.failure or f'{job.objective}={result.value}'}")
    final = {"objective": result.value, "final_tokens": result.tokens, "wt_status": "finished"}
    tune.report({**final, "run_id": result.run_id})


_trainable.__mixins__ = (_FinishOnStop,)  # type: ignore[attr-defined]


# -- the driver side ------------------------------------------------------------------------------


def _eval_tokens(template: TrialTemplate) -> int:
    """Tokens between two evaluations of the base run (ASHA's unit of grace)."""
    from windtunnel.config import resolve

    cfg = template.base
    res = resolve(cfg, cfg.data.vocab_size or 256)
    return res.eval_every_steps * res.tokens_per_step


def _mode(spec: SweepSpec) -> str:
    return "min" if spec.sweep.direction == "minimize" else "max"


def _scheduler(spec: SweepSpec, template: TrialTemplate, record: Path) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    p = spec.sweep.pruner
    if p.kind == "none":
        return FIFOScheduler()
    evals = p.n_warmup_evals if p.kind == "median" else p.min_resource
    return _Asha(
        record,
        time_attr="tokens",
        metric="objective",
        mode=_mode(spec),
        grace_period=max(1, evals) * _eval_tokens(template),
        reduction_factor=max(2, p.reduction_factor),
        max_t=UNBOUNDED_T,
    )


def _start_ray(spec: SweepSpec, cpus: int) -> bool:
    """Start a private local Ray (or join ``launcher.address``); True if we started it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    address = spec.launcher.address if spec.launcher.name == "ray" else None
    kw: dict[str, Any] = {}
    if not address or address == "local":
        address = "local"
        workers = getattr(spec.launcher, "max_workers", None)  # local and ray have it
        kw["num_cpus"] = workers or spec.sweep.parallelism * cpus
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        **kw,
    )
    return True


def run_ray_sweep(spec: SweepSpec) -> SweepSummary:
    """Run (or resume) the sweep with Ray Tune; see the module docstring."""
    s = spec.sweep
    if spec.launcher.name not in ("local", "inline", "ray"):
        raise ValueError(
            f"sweep.engine=ray runs on a local Ray or a Ray cluster, not launcher="
            f"{spec.launcher.name}: use launcher=ray launcher.address=<head:port> (e.g. a Ray "
            "cluster started inside a SLURM allocation) or sweep.engine=optuna"
        )
    spec.folder.mkdir(parents=True, exist_ok=True)
    saved = spec.folder / SUMMARY
    grid = s.sampler.kind == "grid"
    n_target = min(s.n_trials, grid_size(s.space)) if grid else s.n_trials
    if saved.exists():
        done = json.loads(saved.read_text())
        if n_target > done["n_trials"]:
            raise ValueError(
                f"ray sweep {s.name!r} finished with {done['n_trials']} trials and Ray Tune cannot "
                f"extend a finished experiment to {n_target}: use a new sweep.name or "
                "sweep.engine=optuna"
            )
        done["failures"] = {int(k): v for k, v in done["failures"].items()}
        known = {f.name for f in dataclasses.fields(SweepSummary)}
        return SweepSummary(**{k: v for k, v in done.items() if k in known})

    from ray import tune

    t0 = time.time()
    cpus = getattr(spec.launcher, "cpus_per_task", None) or 1  # ray's options
    resources: dict[str, float] = {"cpu": cpus}
    if getattr(spec.launcher, "gpus_per_task", None):
        resources["gpu"] = spec.launcher.gpus_per_task
    template = trial_template(spec)
    tracker, parent = open_parent(spec, template)
    job = _Job(template, s.objective, parent.run_id, s.threads_per_trial or cpus, os.getcwd())
    trainable = tune.with_resources(tune.with_parameters(_trainable, job=job), resources)
    storage = (spec.folder / "ray").resolve()
    experiment = storage / s.name
    owns_ray = _start_ray(spec, cpus)
    try:
        if tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=False)
        else:
            tuner = _new_tuner(spec, template, trainable, storage, n_target, grid)
        with contextlib.redirect_stdout(sys.stderr):  # Tune prints tables: stdout is ours
            fitted = tuner.fit()
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    results = list(fitted)
    summary = _summarize(spec, results, tracker, parent, time.time() - t0)
    if summary.n_trials < n_target:
        raise RuntimeError(_INTERRUPTED.format(s.name, summary.n_trials, n_target))
    close_parent(parent, summary)
    saved.write_text(json.dumps(summary.to_json(), indent=1))
    return summary


def _new_tuner(
    spec: SweepSpec,
    template: TrialTemplate,
    trainable: Any,
    storage: Path,
    n_target: int,
    grid: bool,
) -> Any:
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = spec.sweep
    search = OptunaSearch(
        space=distributions(s.space, grid=grid),
        sampler=make_sampler(s),
        points_to_evaluate=grid_points(s.space)[:n_target] if grid else None,
        study_name=s.name,
        metric="objective",
        mode=_mode(spec),
    )
    namer = _TrialName(s.name)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=_scheduler(spec, template, storage / s.name / STOPPED),
            num_samples=n_target,
            max_concurrent_trials=s.parallelism,
            trial_name_creator=namer,
            trial_dirname_creator=namer,
            reuse_actors=True,  # saves a process start and the imports per trial
        ),
        run_config=tune.RunConfig(name=s.name, storage_path=str(storage), verbose=0),
    )


def _summarize(
    spec: SweepSpec, results: list[Any], tracker: Any, parent: Any, seconds: float
) -> SweepSummary:
    s = spec.sweep
    complete: dict[int, tuple[float, dict[str, Any]]] = {}
    failures: dict[int, str] = {}
    n_pruned = 0
    record = spec.folder / "ray" / s.name / STOPPED
    stopped = set(record.read_text().split()) if record.exists() else set()
    for r in results:
        number = trial_number(Path(r.path).name)
        run_dir = (spec.folder / "runs" / trial_name(s.name, number)).resolve()
        if r.error is not None:
            failures[number] = _reason(r.error)
            _close_trial_run(tracker, run_dir, "FAILED", failures[number], {})
        elif (r.metrics or {}).get("wt_status") == "finished":
            complete[number] = (float(r.metrics["objective"]), {k: r.config[k] for k in s.space})
        elif trial_name(s.name, number) not in stopped:  # stopped by an interrupt
            raise RuntimeError(_INTERRUPTED.format(s.name, len(complete), len(results)))
        else:
            n_pruned += 1
            last = (r.metrics or {}).get("tokens")
            reason = f"pruned: ASHA stopped it at {last} tokens"
            _close_trial_run(tracker, run_dir, "KILLED", reason, {"wt.pruned": "true"})
    best = None
    if complete:
        pick = min if s.direction == "minimize" else max
        best = pick(complete, key=lambda n: complete[n][0])
    best_params = complete[best][1] if best is not None else {}
    return SweepSummary(
        study=s.name,
        storage=f"ray:{(spec.folder / 'ray' / s.name).resolve()}",
        n_trials=len(results),
        n_complete=len(complete),
        n_pruned=n_pruned,
        n_failed=len(failures),
        best_value=complete[best][0] if best is not None else None,
        best_params=best_params,
        best_trial=best,
        best_overrides=s.overrides(best_params),
        parent_run_id=parent.run_id,
        tracking_uri=tracker.tracking_uri,
        folder=str(spec.folder),
        seconds=seconds,
        failures=dict(sorted(failures.items())),
        review=_review(spec, tracker, parent),
    )


_INTERRUPTED = (
    "ray sweep {!r} was interrupted with {} of {} trials done: rerun the same command to resume"
)


def _review(spec: SweepSpec, tracker: Any, parent: Any) -> str:
    """Where to look at the results: the MLflow charts, else Tune's own results."""
    if tracker.tracking_uri and getattr(parent, "experiment_id", None):
        from windtunnel.tracking import mlflow_ui_url

        return mlflow_ui_url(tracker.tracking_uri, parent.experiment_id)
    experiment = (spec.folder / "ray" / spec.sweep.name).resolve()
    return f"tune.ExperimentAnalysis('{experiment}').dataframe()  # from ray import tune"


def _reason(error: Any) -> str:
    """The trial's own exception message, not Ray's wrapping traceback."""
    cause = error
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(cause).__name__
    return text.split("TrialFailed: ", 1)[-1]


def _close_trial_run(
    tracker: Any, run_dir: Path, status: str, reason: str, tags: dict[str, str]
) -> None:
    """End a trial's run that its process left open (stopped by ASHA, or its actor died):
    resume it from its journal and finish it; a finished run is only delivered if need be."""
    from windtunnel.tracking.journal import JOURNAL_NAME, read_state

    journal = run_dir / JOURNAL_NAME
    if not journal.exists():
        return
    state = read_state(journal)
    if state.finish is None:
        run = tracker.start_run(run_dir=run_dir, name=run_dir.name, params={}, tags=tags)
        run.set_tags({"wt.failure_reason": reason[:5000]} if status == "FAILED" else tags)
        run.finish(status, error=reason)
    elif tracker.tracking_uri:
        from windtunnel.tracking import replay_journal

        replay_journal(journal, tracker.tracking_uri)
