"""The Optuna sweep driver: asynchronous ask/tell over any launcher, resumable, nothing lost.

* **Asynchronous**: a new trial is asked for as soon as a slot frees up (no blocking batches);
  TPE runs with ``constant_liar`` so that concurrent asks spread out.
* **Resumable**: the study lives in Optuna's journal file (or an RDB) under the sweep's name.
  Rerunning the same sweep loads it; trials left RUNNING by a dead driver are resubmitted as the
  same trial, whose worker resumes its run folder from the last checkpoint; no trial is
  duplicated, none is lost.
* **Accounted for**: every trial ends COMPLETE, PRUNED or FAIL; a FAIL carries its reason in the
  ``fail_reason`` user attribute (diverged, job killed, …). A job that died is resubmitted up to
  ``max_retries`` times first.
* **Tracked**: one MLflow parent run per sweep; each trial is a nested run tagged with the study
  and trial number; the best value and parameters are recorded on the parent.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from windtunnel import compat
from windtunnel.launch.options import with_ranks
from windtunnel.sweep.parent import SweepSummary, close_parent, open_parent
from windtunnel.sweep.resources import (
    apply_rule,
    model_params,
    rule_index,
    rule_launcher,
    trial_flops,
)
from windtunnel.sweep.spec import (
    ResourceRule,
    SweepSpec,
    distributions,
    grid_points,
    grid_size,
    make_pruner,
    make_sampler,
    to_plain,
)
from windtunnel.sweep.template import trial_template
from windtunnel.sweep.trial import OptunaTrial, TrialResult, TrialSpec, TrialTemplate, open_storage

ATTEMPTS = "wt.attempts"
FAIL_REASON = "fail_reason"
POLL_MIN_S = 0.02


def storage_url(spec: SweepSpec) -> str:
    if spec.sweep.storage:
        if spec.sweep.storage.startswith("sqlite") and spec.sweep.parallelism > 1:
            raise ValueError(
                "sweep.storage is a SQLite file shared by concurrent writers, which corrupts or "
                "locks under load: leave it empty (journal file) or use PostgreSQL/MySQL"
            )
        return spec.sweep.storage
    return f"journal:{(spec.folder / 'optuna.journal').resolve()}"


class Driver:
    def __init__(
        self, spec: SweepSpec, *, view: Any = None, template: TrialTemplate | None = None
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec, self.s = spec, spec.sweep
        spec.folder.mkdir(parents=True, exist_ok=True)
        (spec.folder / "spec.json").write_text(json.dumps(to_plain(spec), indent=1, default=str))
        self.url = storage_url(spec)
        self.study = optuna.create_study(
            study_name=self.s.name,
            storage=open_storage(self.url),
            sampler=make_sampler(self.s),
            pruner=make_pruner(self.s),
            direction=self.s.direction,
            load_if_exists=True,
        )
        # A resumed study must not replay the seeded sampler's sequence from the start: seed it
        # with the number of trials it already has (deterministic for a given history).
        n_before = len(self.study.get_trials(deepcopy=False))
        if n_before:
            self.study.sampler = make_sampler(self.s, seed_offset=n_before)
        grid = self.s.sampler.kind == "grid"
        self.dists = distributions(self.s.space, grid=grid)
        self.n_target = min(self.s.n_trials, grid_size(self.s.space)) if grid else self.s.n_trials
        self.template: TrialTemplate = template or trial_template(spec)
        if grid:
            self._enqueue_grid(self.template)
        self.view = view
        self.active: dict[int, tuple[Any, OptunaTrial]] = {}  # trial number → (handle, job)
        self.launchers: dict[str | None, Any] = {}  # the trials' launcher options → a launcher
        self.failures: dict[int, str] = {}
        self.started: dict[int, float] = {}  # trial number → when its job was submitted
        self.busy_s = 0.0  # trial-seconds × threads, of jobs collected in this run
        self.parent = None
        self.tracker = None

    def _enqueue_grid(self, template: TrialTemplate) -> None:
        """Queue the grid points the study has not seen yet (so a resumed grid continues),
        the most expensive first: with trials of very different cost (a ladder's sizes), the
        longest one starts at once and the short ones fill the other slots around it, instead
        of the longest running alone at the end while the other slots idle."""
        seen = [  # a queued (WAITING) trial keeps its point in system_attrs, not params
            t.params or t.system_attrs.get("fixed_params", {})
            for t in self.study.get_trials(deepcopy=False)
        ]
        points = [p for p in grid_points(self.s.space)[: self.n_target] if p not in seen]
        for point in longest_first(self.spec, template, points):
            self.study.enqueue_trial(point)

    def _n_started(self) -> int:
        from optuna.trial import TrialState

        return sum(t.state != TrialState.WAITING for t in self.study.get_trials(deepcopy=False))

    # -- the trial's job ------------------------------------------------------------------------
    @property
    def local(self) -> bool:
        return self.spec.launcher.name in ("local", "inline")

    def _threads(self) -> int:
        """torch threads per trial: ``sweep.threads_per_trial``, else on this machine its cores
        shared by the trials that run at once (a sweep of one trial gets them all)."""
        threads = self.s.threads_per_trial
        if not threads and self.local:
            at_once = max(1, min(self.s.parallelism, self.n_target))
            threads = max(1, (os.cpu_count() or 1) // at_once)
        return threads

    def _job(self, trial_id: int, number: int, params: dict[str, Any]) -> OptunaTrial:
        threads = self._threads()
        parent = self.parent.run_id if self.parent else None
        config = self.template.config(number, params, parent_run_id=parent, threads=threads)
        config = apply_rule(config, trial_rule(self.spec, config))
        return OptunaTrial(
            spec=TrialSpec(config=config, objective=self.s.objective),
            storage=self.url,
            study=self.s.name,
            trial_id=trial_id,
            number=number,
            n_warmup_evals=self.s.pruner.n_warmup_evals,
            pruner=self.s.pruner,
        )

    # -- resources -------------------------------------------------------------------------------
    def _launcher(self, config: Any) -> Any:
        """The launcher of the trial's resources (made on first use, closed at the end)."""
        from windtunnel.launch import make_launcher

        opts = trial_options(self.spec, config)
        key = None if opts == self.spec.launcher else repr(opts)
        if key not in self.launchers:
            self.launchers[key] = make_launcher(opts)
        return self.launchers[key]

    def _close_launchers(self) -> None:
        for key, launcher in list(self.launchers.items()):
            if key is not None:
                launcher.close()
                del self.launchers[key]

    # -- tracking --------------------------------------------------------------------------------
    def _open_parent(self) -> None:
        self.tracker, self.parent = open_parent(self.spec, self.template)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, launcher: Any, poll_s: float = 0.5) -> SweepSummary:
        """Keep ``parallelism`` trials running until the study has its trials.

        Finished jobs are looked for every 20 ms right after a change, backing off to every
        ``poll_s`` while nothing finishes (a short trial's result is collected at once; a long
        sweep does not spin)."""
        from optuna.trial import TrialState

        t0 = time.time()
        self.launchers[None] = launcher
        self._open_parent()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self._submit(compat.trial_id(t), t.number, t.params, resumed=True)
        wait_s, last_view = POLL_MIN_S, 0.0
        try:
            while True:
                while len(self.active) < self.s.parallelism and self._n_started() < self.n_target:
                    trial = self.study.ask(self.dists)
                    self._submit(compat.trial_id(trial), trial.number, trial.params)
                if not self.active:
                    break
                finished = [n for n, (h, _) in self.active.items() if h.done()]
                for n in finished:
                    self._collect(n)
                if self.view is not None and (finished or time.time() - last_view >= poll_s):
                    self.view.update(self.study, self.active)
                    last_view = time.time()
                if finished:
                    wait_s = POLL_MIN_S
                else:
                    time.sleep(wait_s)
                    wait_s = min(poll_s, wait_s * 1.5)
        finally:
            self._close_launchers()
            if self.view is not None:
                self.view.close(self.study)
        summary = self.summary(time.time() - t0)
        self._close_parent(summary)
        return summary

    def _submit(
        self,
        trial_id: int,
        number: int,
        params: dict[str, Any],
        resumed: bool = False,
    ) -> None:
        import optuna

        job = self._job(trial_id, number, params)
        trial = optuna.Trial(self.study, trial_id)
        attempts = int(trial.user_attrs.get(ATTEMPTS, 0)) + 1
        trial.set_user_attr(ATTEMPTS, attempts)
        if resumed:
            trial.set_user_attr("wt.resumed", True)
        self.active[number] = (self._launcher(job.spec.config).submit(job), job)
        self.started.setdefault(number, time.time())

    def _collect(self, number: int) -> None:
        import optuna
        from optuna.trial import TrialState

        handle, job = self.active.pop(number)
        self.busy_s += (time.time() - self.started.pop(number, time.time())) * self._threads()
        trial = optuna.Trial(self.study, job.trial_id)
        try:
            out: TrialResult = handle.result(timeout=60)
        except Exception as e:  # the job died: killed, node lost, time limit, worker error
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            if int(trial.user_attrs.get(ATTEMPTS, 1)) <= self.s.max_retries:
                self._submit(job.trial_id, number, trial.params)
                return
            self._fail(trial, f"job failed: {reason}")
            return
        status = out.status
        for key in ("run_id", "tokens", "flops"):  # compute spent, also by pruned trials
            trial.set_user_attr(key, getattr(out, key))
        if status == "finished" and math.isfinite(out.value):
            self.study.tell(job.trial_id, out.value)
        elif status == "pruned":
            self.study.tell(job.trial_id, state=TrialState.PRUNED)
        elif status == "preempted" and int(trial.user_attrs.get(ATTEMPTS, 1)) <= self.s.max_retries:
            self._submit(job.trial_id, number, trial.params)
        else:
            self._fail(trial, f"{status}: {out.failure}")

    def _fail(self, trial: Any, reason: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(FAIL_REASON, reason[:2000])
        self.failures[trial.number] = reason
        self.study.tell(compat.trial_id(trial), state=TrialState.FAIL)

    # -- results ---------------------------------------------------------------------------------
    def summary(self, seconds: float = 0.0) -> SweepSummary:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        count = {st: sum(t.state == st for t in trials) for st in TrialState}
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        best = self.study.best_trial if done else None
        failures = {
            t.number: str(t.user_attrs.get(FAIL_REASON, ""))
            for t in trials
            if t.state == TrialState.FAIL
        }
        return SweepSummary(
            study=self.s.name,
            storage=self.url,
            n_trials=len(trials),
            n_complete=count[TrialState.COMPLETE],
            n_pruned=count[TrialState.PRUNED],
            n_failed=count[TrialState.FAIL],
            best_value=best.value if best else None,
            best_params=dict(best.params) if best else {},
            best_trial=best.number if best else None,
            best_overrides=self.s.overrides(dict(best.params)) if best else [],
            parent_run_id=self.parent.run_id if self.parent else "",
            tracking_uri=self.tracker.tracking_uri if self.tracker else "",
            folder=str(self.spec.folder),
            seconds=seconds,
            failures=failures,
            review=f"optuna-dashboard {self.url.removeprefix('journal:')}",
            core_busy=(
                min(1.0, self.busy_s / (seconds * (os.cpu_count() or 1)))
                if self.local and seconds > 0 and self.busy_s > 0
                else None
            ),
        )

    def _close_parent(self, summary: SweepSummary) -> None:
        if self.parent is not None:
            close_parent(self.parent, summary)


def trial_ranks(spec: SweepSpec, template: TrialTemplate) -> None:
    """Check, before anything runs, that the launcher can start every trial's ranks (its
    resource rule and ``train.nproc_per_node``); one line where it cannot (Ray, packing)."""
    for cfg in template.configs.values():
        rule = trial_rule(spec, cfg)
        nproc = apply_rule(cfg, rule).train.nproc_per_node
        if spec.sweep.engine == "ray" and (nproc > 1 or spec.sweep.resources):
            raise ValueError(
                f"train.nproc_per_node={nproc} / sweep.resources: sweep.engine=ray runs each "
                "trial as one process on its own resources; run trials of several ranks with "
                "sweep.engine=optuna and launcher=slurm or launcher=local"
            )
        trial_options(spec, cfg)


def longest_first(
    spec: SweepSpec, template: TrialTemplate, points: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Grid points in decreasing training FLOPs of their trial (ties keep the grid's order)."""

    def cost(point: dict[str, Any]) -> float:
        cfg = template.config(0, point)
        try:
            return trial_flops(apply_rule(cfg, trial_rule(spec, cfg)))
        except ValueError:  # an invalid run: its trial fails with the reason, in grid order
            return 0.0

    return sorted(points, key=cost, reverse=True)


def trial_rule(spec: SweepSpec, cfg: Any) -> ResourceRule | None:
    """The ``sweep.resources`` rule of a trial's run config (None: the sweep's launcher)."""
    rules = spec.sweep.resources
    i = rule_index(rules, model_params(cfg)) if rules else None
    return None if i is None else rules[i]


def trial_options(spec: SweepSpec, cfg: Any) -> Any:
    """The launcher options a trial runs under: its rule's, set for its ranks."""
    rule = trial_rule(spec, cfg)
    nproc = apply_rule(cfg, rule).train.nproc_per_node
    return with_ranks(rule_launcher(spec.launcher, rule), nproc)


def run_sweep(spec: SweepSpec, *, view: Any = None) -> SweepSummary:
    """Run (or resume) a sweep to its end with the spec's launcher."""
    template = trial_template(spec)
    trial_ranks(spec, template)
    if spec.sweep.engine == "ray":
        from windtunnel.sweep.ray_tune import run_ray_sweep

        return run_ray_sweep(spec)
    from windtunnel.launch import make_launcher

    launcher = make_launcher(spec.launcher)
    try:
        return Driver(spec, view=view, template=template).run(launcher)
    finally:
        launcher.close()
