"""Run a tunnel: its stages in order, each feeding the next, resumable, tracked, reported.

State lives in ``<tunnel.dir>/<name>/state.json``: per stage its status, result and the key of
the inputs it ran with. A rerun skips finished stages whose inputs are unchanged, continues an
unfinished sweep (its Optuna study resumes by name: finished trials are kept, interrupted ones
resume from their checkpoints) and refuses a finished stage whose inputs changed. What a stage
does, finds and reports is its own module (:mod:`windtunnel.tunnel.stages`); this module only
loops over them, keeps the state and the lock, and opens and closes the tunnel's MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from windtunnel.files import LockHeld, acquire, atomic_write
from windtunnel.schema import FileModel, load_versioned, written
from windtunnel.tunnel.spec import TunnelSpec
from windtunnel.tunnel.stage import Context, PureStage, Stage, TunnelError, say
from windtunnel.tunnel.stages import NAMES, STAGES

STATE_VERSION = 1
"""Layout of ``state.json``: ``{"version", "tunnel", "report", "stages": {name: {"status",
"key", "seconds", "error", "result"}}}``, each result its stage's dataclass as
``dataclasses.asdict``. Files from before the version field have this same layout (version 1)."""


# -- the state ------------------------------------------------------------------------------------


def state_path(tf: TunnelSpec) -> Path:
    return tf.folder / "state.json"


class StageState(FileModel):
    status: Literal["running", "done", "failed", "skipped"]
    key: str | None = None
    seconds: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None


class StateFile(FileModel):
    """``state.json``'s schema (each stage's ``result`` is checked by its stage's ``load``)."""

    version: int = 1
    tunnel: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, str] = Field(default_factory=dict)
    stages: dict[str, StageState]


def load_state(path: Path) -> dict[str, Any]:
    """``state.json`` as saved (a new state if there is none); another version, or a field
    this windtunnel cannot read, is refused (:class:`~windtunnel.schema.SchemaError`)."""
    if not path.is_file():
        return {"version": STATE_VERSION, "stages": {}}
    _, state = load_versioned(
        path,
        {STATE_VERSION: StateFile},
        what="tunnel state",
        fix=f"delete {path.parent} or use a new tunnel.name",
    )
    state.setdefault("version", 1)  # unversioned files: version 1's layout
    return state


def check_results(state: dict[str, Any], path: Path) -> None:
    """Every finished stage's result reads back into its dataclass, or the state is refused."""
    for stage in STAGES:
        s = state["stages"].get(stage.name) or {}
        if s.get("status") == "done":
            try:
                stage.load(s["result"])
            except (KeyError, TypeError, ValueError) as e:
                raise TunnelError(
                    f"{path}: the {stage.name} result is not one this windtunnel reads ({e}); "
                    f"delete {path.parent} or use a new tunnel.name"
                ) from None


def save_state(path: Path, state: dict[str, Any]) -> None:
    state["version"] = STATE_VERSION
    text = json.dumps(state, indent=1, default=str)
    written(StateFile, json.loads(text))
    atomic_write(path, text)


@contextlib.contextmanager
def tunnel_lock(folder: Path) -> Iterator[None]:
    """One ``windtunnel tunnel`` per tunnel folder at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    held = f"another `windtunnel tunnel` is running on {folder}; wait for it or stop it"
    try:
        held_lock = acquire(folder / "tunnel.lock", blocking=False, held_message=held)
    except LockHeld as e:
        raise TunnelError(str(e)) from None
    try:
        yield
    finally:
        held_lock.release()


def stage_key(ctx: Context, stage: Stage[Any]) -> str:
    """What a stage's result depends on (:meth:`Stage.key`), hashed."""
    parts = stage.key(ctx)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the driver ---------------------------------------------------------------------------------


def run_tunnel(tf: TunnelSpec, *, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the tunnel; return its summary (report paths, stage statuses)."""
    from windtunnel.tunnel.report import write_report

    unknown = [s for s in only or [] if s not in NAMES]
    if unknown:
        raise TunnelError(f"unknown stage(s) {unknown}; stages are {', '.join(NAMES)}")
    with tunnel_lock(tf.folder):
        path = state_path(tf)
        ctx = Context(tf, load_state(path))
        check_results(ctx.state, path)
        ctx.state["tunnel"] = dataclasses.asdict(tf.tunnel)
        tracker, parent = _open_parent(tf)
        t_start = time.perf_counter()
        try:
            for stage in STAGES:
                _run_stage(ctx, stage, path, only)
            report = write_report(ctx.folder, ctx.state)
        except BaseException as e:
            with contextlib.suppress(Exception):  # what finished is still worth a page
                ctx.state["report"] = {
                    k: str(v) for k, v in write_report(ctx.folder, ctx.state).items()
                }
                save_state(path, ctx.state)
            parent.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", str(e))
            raise
        ctx.state["report"] = {k: str(v) for k, v in report.items()}
        save_state(path, ctx.state)
        _close_parent(parent, ctx, report)
        summary = status(tf)
        summary["seconds"] = time.perf_counter() - t_start
        summary["tracking_uri"] = tracker.tracking_uri
        summary["dashboard"] = _dashboard(tracker.tracking_uri, parent)
        summary["charts"] = ladder_charts_url(tracker.tracking_uri, tf.tunnel.name)
        return summary


def _run_stage(ctx: Context, stage: Stage[Any], path: Path, only: list[str] | None) -> None:
    stages, name = ctx.state["stages"], stage.name
    prev = stages.get(name) or {}
    if not ctx.tf.enabled(name) or (only and name not in only):
        if prev.get("status") != "done":
            stages[name] = {"status": "skipped"}
        return
    key = stage_key(ctx, stage)
    if prev.get("status") == "done":
        if prev.get("key") != key and isinstance(stage, PureStage):
            say(f"{name}: its settings or inputs changed; computing it again (seconds)")
        elif prev.get("key") != key:
            raise TunnelError(
                f"stage {name} already finished with other settings or inputs; keep them, or "
                f"start a new tunnel (tunnel.name=...), or delete {ctx.folder} to redo it"
            )
        else:
            say(f"{name}: done before, skipped")
            return
    say(f"{name}: running")
    stages[name] = {"status": "running", "key": key}
    save_state(path, ctx.state)
    t0 = time.perf_counter()
    try:
        result = stage.run(ctx)
    except Exception as e:
        stages[name] = {"status": "failed", "key": key, "error": f"{type(e).__name__}: {e}"}
        save_state(path, ctx.state)
        raise
    stages[name] = {
        "status": "done",
        "key": key,
        "seconds": time.perf_counter() - t0,
        "result": stage.dump(result),
    }
    save_state(path, ctx.state)
    say(f"{name}: done in {time.perf_counter() - t0:.0f}s")


def _open_parent(tf: TunnelSpec) -> tuple[Any, Any]:
    from windtunnel.compose import compose_run
    from windtunnel.tracking import open_tracker

    base = compose_run([*tf.tunnel.run, *tf.run])
    tracker = open_tracker(base.tracker)
    parent = tracker.start_run(
        run_dir=tf.folder / "parent",
        name=f"tunnel-{tf.tunnel.name}",
        experiment=tf.tunnel.name,
        params={
            "tunnel": dataclasses.asdict(tf.tunnel),
            "launcher": dataclasses.asdict(tf.launcher),
        },
        tags={"wt.kind": "tunnel", "wt.tunnel": tf.tunnel.name, "wt.stage": "tunnel"},
    )
    return tracker, parent


def _close_parent(parent: Any, ctx: Context, report: dict[str, Path]) -> None:
    """Every finished stage's metrics and artifacts, and the report, on the tunnel's run."""
    metrics: dict[str, float] = {}
    artifacts = [Path(p) for p in report.values()]
    for stage in STAGES:
        result = ctx.result(stage)
        if result is not None:
            metrics.update(stage.metrics(result))
            artifacts += stage.artifacts(result)
    if metrics:
        parent.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=0)
    for p in artifacts:
        parent.log_artifact(p)
    parent.finish("FINISHED")


def _dashboard(uri: str, parent: Any) -> str:
    """The tunnel run's MLflow page (the server's address until the run has synced)."""
    from windtunnel.tracking.server import mlflow_ui_url

    exp, run_id = getattr(parent, "experiment_id", None), getattr(parent, "mlflow_run_id", None)
    if not uri.startswith("http"):
        return ""
    return mlflow_ui_url(uri, exp, run_id) if exp and run_id else uri


def ladder_charts_url(uri: str, tunnel: str) -> str:
    """MLflow's chart page of the ladder's training runs (loss against tokens), listed flat."""
    if not uri.startswith("http"):
        return ""
    try:
        from windtunnel.tracking.api import RestClient
        from windtunnel.tracking.browser import chart_url

        client = RestClient(uri)
        exp = client.get_experiment_by_name(f"{tunnel}/ladder")
        if exp is None:
            return ""
        runs = itertools.islice(client.search_runs([exp["experiment_id"]], page_size=200), 200)
        ids = [
            r["info"]["run_id"]
            for r in runs
            if {t["key"]: t["value"] for t in r.get("data", {}).get("tags", [])}.get("wt.kind")
            != "sweep"
        ]
        return chart_url(uri, exp["experiment_id"], ids[:100])
    except Exception:  # a link is a convenience: never fail a finished tunnel over it
        return ""


# -- status --------------------------------------------------------------------------------------


def status(tf: TunnelSpec) -> dict[str, Any]:
    """Where a tunnel stands: each stage's status, time and headline, and the report."""
    return summarize(load_state(state_path(tf)), tf.folder, tf.enabled)


def summarize(
    state: dict[str, Any], folder: Path, enabled: Callable[[str], bool] = lambda _: True
) -> dict[str, Any]:
    """A tunnel's state as status rows (live trial counts for unfinished sweep stages)."""
    rows = []
    for stage in STAGES:
        s = state["stages"].get(stage.name) or {}
        status_ = s.get("status") or ("pending" if enabled(stage.name) else "disabled")
        row: dict[str, Any] = {"stage": stage.name, "status": status_}
        if "seconds" in s:
            row["seconds"] = round(s["seconds"], 1)
        if s.get("error"):
            row["error"] = s["error"]
        if status_ in ("running", "failed", "pending"):
            row.update(stage.progress(folder))
        if status_ == "done":
            row["headline"] = stage.headline(stage.load(s["result"]))
        rows.append(row)
    return {
        "tunnel": folder.name,
        "folder": str(folder),
        "stages": rows,
        "report": state.get("report", {}),
        "done": all(r["status"] in ("done", "skipped", "disabled") for r in rows),
    }
