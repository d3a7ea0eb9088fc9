"""What both sweep engines (the Optuna driver and Ray Tune) record: the sweep's MLflow parent
run, and the summary a sweep returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from windtunnel.sweep.spec import SweepSpec, to_plain
from windtunnel.sweep.trial import TrialTemplate


@dataclass
class SweepSummary:
    study: str
    storage: str
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    best_overrides: list[str]
    """The best parameters as run-config overrides (``optim.lr=0.0071``)."""
    parent_run_id: str
    tracking_uri: str
    folder: str
    seconds: float = 0.0
    failures: dict[int, str] = field(default_factory=dict)
    review: str = ""
    """How to look at the study: the optuna-dashboard command for its storage."""
    core_busy: float | None = None
    """Share of this machine's cores the trials kept busy over the sweep's wall-clock (local
    launchers; None elsewhere): low when slots idle, e.g. a long trial running alone."""

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def open_parent(spec: SweepSpec, template: TrialTemplate) -> tuple[Any, Any]:
    """``(tracker, parent run)`` of the sweep (resumes the unfinished parent in its folder)."""
    from windtunnel.tracking import open_tracker

    s = spec.sweep
    base = template.base
    tracker = open_tracker(base.tracker)
    parent = tracker.start_run(
        run_dir=spec.folder / "parent",
        name=f"sweep-{s.name}",
        experiment=base.tracker.experiment,
        params={"sweep": to_plain(spec)},
        tags={
            "wt.kind": "sweep",
            "wt.stage": s.stage,
            "wt.sweep": s.name,
            "optuna.study": s.name,
        },
    )
    return tracker, parent


def close_parent(parent: Any, summary: SweepSummary) -> None:
    """Record the best trial and the counts on the parent run and finish it."""
    tags = {f"best.{k}": str(v) for k, v in summary.best_params.items()}
    tags["best.trial"] = str(summary.best_trial)
    parent.set_tags(tags)
    metrics = {
        "n_complete": summary.n_complete,
        "n_pruned": summary.n_pruned,
        "n_failed": summary.n_failed,
    }
    if summary.best_value is not None:
        metrics["best_value"] = summary.best_value
    parent.log_metrics(metrics, step=summary.n_trials)
    parent.log_dict(summary.to_json(), "sweep_summary.json")
    parent.finish("FINISHED")
