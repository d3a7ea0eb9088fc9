"""Run a tunnel: its stages in order, each feeding the next, resumable, tracked, reported.

State lives in ``<tunnel.dir>/<name>/state.json``: per stage its status, result and the key of
the inputs it ran with. A rerun skips finished stages whose inputs are unchanged, continues an
unfinished sweep (its Optuna study resumes by name: finished trials are kept, interrupted ones
resume from their checkpoints) and refuses a finished stage whose inputs changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from windtunnel.tunnel import stages as st
from windtunnel.tunnel.spec import STAGES, SWEEP_STAGES, TunnelSpec


class TunnelError(RuntimeError):
    """A tunnel cannot go on; the message says why and what to do."""


def state_path(tf: TunnelSpec) -> Path:
    return tf.folder / "state.json"


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"stages": {}}
    return json.loads(path.read_text())


def save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def tunnel_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tunnel.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TunnelError(
                f"another `windtunnel tunnel` is running on {folder}; wait for it or stop it"
            ) from None
        yield


def say(msg: str) -> None:
    print(f"[tunnel] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Context:
    tf: TunnelSpec
    state: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.tf.folder

    def result(self, stage: str) -> dict[str, Any] | None:
        s = self.state["stages"].get(stage) or {}
        return s.get("result") if s.get("status") == "done" else None

    def upstream(self) -> list[str]:
        """What earlier stages found, as run overrides (the μP optimum)."""
        mup = self.result("mup_search")
        return list(mup["best_overrides"]) if mup else []

    def mup_params(self) -> dict[str, Any]:
        mup = self.result("mup_search")
        return dict(mup["best_params"]) if mup else {}

    def plots(self) -> Path:
        p = self.folder / "plots"
        p.mkdir(parents=True, exist_ok=True)
        return p


# -- the stages --------------------------------------------------------------------------------


def _run_sweep(ctx: Context, stage: str, spec: Any) -> tuple[dict[str, Any], list[dict]]:
    from windtunnel.sweep import run_sweep
    from windtunnel.sweep.view import SweepView

    n = spec.sweep.n_trials
    if spec.sweep.sampler.kind == "grid":
        from windtunnel.sweep.spec import grid_size

        n = min(n, grid_size(spec.sweep.space))
    say(f"{stage}: {n} trials, parallelism {spec.sweep.parallelism}, launcher {spec.launcher.name}")
    summary = run_sweep(spec, view=SweepView(n, f"{ctx.tf.tunnel.name}/{stage}"))
    trials = st.trial_records(spec)
    if not any(t["state"] == "COMPLETE" for t in trials):
        reasons = "; ".join(f"#{k}: {v}" for k, v in list(summary.failures.items())[:3])
        raise TunnelError(
            f"stage {stage}: no trial finished ({summary.n_failed} failed{': ' + reasons if reasons else ''}); "
            f"fix the cause and rerun — finished trials are kept ({spec.folder})"
        )
    compact = [
        {k: t[k] for k in ("number", "state", "params", "value", "intermediate", "failure")}
        for t in trials
    ]
    return {"summary": summary.to_json(), "trials": compact}, trials


def stage_mup_search(ctx: Context) -> dict[str, Any]:
    from windtunnel.tunnel import plots

    spec = st.sweep_spec(ctx.tf, "mup_search", [])
    out, _ = _run_sweep(ctx, "mup_search", spec)
    out.update(st.mup_result(out["summary"], spec))
    out["objective"] = spec.sweep.objective
    out["plots"] = [
        str(
            plots.search_history(
                out["trials"], ctx.plots(), spec.sweep.objective, direction=spec.sweep.direction
            )
        )
    ]
    return out


def stage_lr_transfer(ctx: Context) -> dict[str, Any]:
    from windtunnel.scaling import plots
    from windtunnel.scaling.batch_lr import mutransfer_check
    from windtunnel.scaling.errors import ScalingError

    t = ctx.tf.tunnel
    spec = st.sweep_spec(ctx.tf, "lr_transfer", ctx.upstream())
    lr = ctx.mup_params().get("optim.lr")
    if t.lr_transfer.lr_factors and lr:
        spec = st.lr_grid_overrides(spec, float(lr), t.lr_transfer.lr_factors)
    out, trials = _run_sweep(ctx, "lr_transfer", spec)
    table = st.lr_transfer_table(trials, t.fit.target)
    out["table"] = table.to_dict(orient="records")
    out["mup_lr"] = lr
    try:
        check = mutransfer_check(table, target=t.fit.target)
        out["check"] = check.to_dict()
        out["plots"] = [str(plots.lr_sweeps(table, check, ctx.plots(), target=t.fit.target))]
    except ScalingError as e:
        out["check"] = {"skipped": str(e)}
    return out


def stage_batch_size(ctx: Context) -> dict[str, Any]:
    from windtunnel.scaling import plots
    from windtunnel.scaling.errors import ScalingError

    spec = st.sweep_spec(ctx.tf, "batch_size", ctx.upstream())
    out, trials = _run_sweep(ctx, "batch_size", spec)
    curves = st.batch_curves(trials, ctx.tf.tunnel.fit.target)
    curves.to_csv(ctx.folder / "batch_curves.csv", index=False)
    try:
        law = st.batch_law(curves)
        out["law"] = {**law.to_dict(), "points": law.points.to_dict(orient="records")}
        out["plots"] = [str(plots.batch_size_law(law, ctx.plots()))]
    except ScalingError as e:
        out["law"] = {"skipped": str(e)}
    return out


def stage_ladder(ctx: Context) -> dict[str, Any]:
    from windtunnel.tunnel import plots

    spec = st.sweep_spec(ctx.tf, "ladder", ctx.upstream())
    out, trials = _run_sweep(ctx, "ladder", spec)
    points = st.ladder_points(trials)
    points.to_csv(ctx.folder / "ladder_points.csv", index=False)
    out["points"] = points.to_dict(orient="records")
    out["plots"] = [str(plots.ladder_curves(trials, ctx.plots(), ctx.tf.tunnel.fit.target))]
    return out


def _points(ctx: Context) -> Any:
    import pandas as pd

    ladder = ctx.result("ladder")
    if ladder is None or not ladder["points"]:
        raise TunnelError("the fit needs the ladder's points: run the ladder stage first")
    return pd.DataFrame(ladder["points"])


def stage_fit(ctx: Context) -> dict[str, Any]:
    from windtunnel.scaling.analyze import analyze, json_summary, write_outputs

    f, p = ctx.tf.tunnel.fit, ctx.tf.tunnel.plan
    df = _points(ctx)
    fit_file, fit, boot, extras = analyze(
        df, target=f.target, form=f.form, budgets=(p.budget_flops,), n_boot=f.bootstrap, seed=f.seed
    )
    bs = ctx.result("batch_size")
    if bs and "k" in bs.get("law", {}):
        fit_file["batch_size_law"] = {k: bs["law"][k] for k in ("k", "gamma")}
    fit_file["lr"] = ctx.mup_params().get("optim.lr", fit_file.get("lr"))
    paths = write_outputs(fit_file, df, fit, boot, extras, ctx.folder / "fit", target=f.target)
    return {
        "fit_file": str(paths[0]),
        "summary": json_summary(fit_file),
        "plots": [str(x) for x in paths if x.suffix == ".png"],
    }


def stage_plan(ctx: Context) -> dict[str, Any]:
    from windtunnel.scaling.plan import load_fit_file, make_plan

    fit = ctx.result("fit")
    if fit is None:
        raise TunnelError("the plan needs the fit: run the fit stage first")
    p = ctx.tf.tunnel.plan
    mup = {
        k.removeprefix("model."): v for k, v in ctx.mup_params().items() if k.startswith("model.")
    }
    plan = make_plan(
        load_fit_file(fit["fit_file"]),
        budget_flops=p.budget_flops,
        gpu=p.gpu,
        mfu=p.mfu,
        seq_len=p.seq_len,
        vocab_size=p.vocab_size,
        mup=mup,
        name=f"{ctx.tf.tunnel.name}_full",
    )
    out = ctx.folder / "plan"
    out.mkdir(exist_ok=True)
    text = plan.to_yaml()
    (out / "full_run.yaml").write_text(text)
    return {**plan.to_dict(), "config": str(out / "full_run.yaml"), "yaml": text}


def stage_backtest(ctx: Context) -> dict[str, Any]:
    from windtunnel.scaling.backtest import backtest
    from windtunnel.tunnel import plots

    t = ctx.tf.tunnel
    res = backtest(_points(ctx), target=t.fit.target, mode="largest", form=t.fit.form)
    out = res.to_dict()
    out["target_error"] = t.backtest.target_error
    out["min_extrapolation"] = float(res.table["extrapolation"].min())
    out["plots"] = [str(plots.backtest(res.table, ctx.plots(), t.fit.target))]
    return out


STAGE_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "mup_search": stage_mup_search,
    "lr_transfer": stage_lr_transfer,
    "batch_size": stage_batch_size,
    "ladder": stage_ladder,
    "fit": stage_fit,
    "plan": stage_plan,
    "backtest": stage_backtest,
}


def stage_key(ctx: Context, stage: str) -> str:
    """What a stage's result depends on: its settings and the run overrides it is given."""
    t = ctx.tf.tunnel
    parts: dict[str, Any] = {"settings": dataclasses.asdict(getattr(t, stage))}
    if stage in SWEEP_STAGES:
        parts["run"] = [*t.run, *ctx.tf.run]
        if stage != "mup_search":  # what the search found feeds every later sweep
            parts["upstream"] = ctx.upstream()
    else:
        parts["fit"] = dataclasses.asdict(t.fit)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the driver ---------------------------------------------------------------------------------


def run_tunnel(tf: TunnelSpec, *, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the tunnel; return its summary (report paths, stage statuses)."""
    unknown = [s for s in only or [] if s not in STAGES]
    if unknown:
        raise TunnelError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    with tunnel_lock(tf.folder):
        path = state_path(tf)
        ctx = Context(tf, load_state(path))
        ctx.state["tunnel"] = dataclasses.asdict(tf.tunnel)
        tracker, parent = _open_parent(tf)
        t_start = time.perf_counter()
        try:
            for stage in STAGES:
                _run_stage(ctx, stage, path, only)
            from windtunnel.tunnel.report import write_report

            report = write_report(ctx.folder, ctx.state)
        except BaseException as e:
            with contextlib.suppress(Exception):  # what finished is still worth a page
                from windtunnel.tunnel.report import write_report

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


def _run_stage(ctx: Context, stage: str, path: Path, only: list[str] | None) -> None:
    stages = ctx.state["stages"]
    prev = stages.get(stage) or {}
    if not ctx.tf.enabled(stage) or (only and stage not in only):
        if prev.get("status") != "done":
            stages[stage] = {"status": "skipped"}
        return
    key = stage_key(ctx, stage)
    if prev.get("status") == "done":
        if prev.get("key") != key:
            raise TunnelError(
                f"stage {stage} already finished with other settings or inputs; keep them, or "
                f"start a new tunnel (tunnel.name=...), or delete {ctx.folder} to redo it"
            )
        say(f"{stage}: done before, skipped")
        return
    say(f"{stage}: running")
    stages[stage] = {"status": "running", "key": key}
    save_state(path, ctx.state)
    t0 = time.perf_counter()
    try:
        result = STAGE_FUNCS[stage](ctx)
    except Exception as e:
        stages[stage] = {"status": "failed", "key": key, "error": f"{type(e).__name__}: {e}"}
        save_state(path, ctx.state)
        raise
    stages[stage] = {
        "status": "done",
        "key": key,
        "seconds": time.perf_counter() - t0,
        "result": result,
    }
    save_state(path, ctx.state)
    say(f"{stage}: done in {time.perf_counter() - t0:.0f}s")


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
    metrics: dict[str, float] = {}
    fit = ctx.result("fit")
    if fit:
        s = fit["summary"]
        metrics.update({f"fit.{k}": s[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")})
        alloc = next(iter(s["allocation"].values()))
        metrics["tokens_per_param"] = alloc["tokens_per_param"]
    bt = ctx.result("backtest")
    if bt:
        metrics["backtest.max_abs_rel_error"] = bt["max_abs_rel_error"]
        metrics["backtest.min_extrapolation"] = bt["min_extrapolation"]
    plan = ctx.result("plan")
    if plan:
        metrics.update(
            {
                "plan.N": plan["N"],
                "plan.D": plan["D"],
                "plan.loss": plan["loss"],
                "plan.gpu_hours": plan["gpu_hours"],
            }
        )
    if metrics:
        parent.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=0)
    for p in report.values():
        parent.log_artifact(Path(p))
    if plan:
        parent.log_artifact(Path(plan["config"]))
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
        from mlflow.tracking import MlflowClient

        from windtunnel.tracking.browser import chart_url

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(f"{tunnel}/ladder")
        if exp is None:
            return ""
        runs = client.search_runs([exp.experiment_id], max_results=200)
        ids = [r.info.run_id for r in runs if r.data.tags.get("wt.kind") != "sweep"]
        return chart_url(uri, exp.experiment_id, ids[:100])
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
        s = state["stages"].get(stage) or {}
        status_ = s.get("status") or ("pending" if enabled(stage) else "disabled")
        row: dict[str, Any] = {"stage": stage, "status": status_}
        if "seconds" in s:
            row["seconds"] = round(s["seconds"], 1)
        if s.get("error"):
            row["error"] = s["error"]
        if stage in SWEEP_STAGES and status_ in ("running", "failed", "pending"):
            row.update(_sweep_progress(folder, stage))
        if status_ == "done":
            row["headline"] = headline(stage, s["result"])
        rows.append(row)
    return {
        "tunnel": folder.name,
        "folder": str(folder),
        "stages": rows,
        "report": state.get("report", {}),
        "done": all(r["status"] in ("done", "skipped", "disabled") for r in rows),
    }


def _sweep_progress(folder: Path, stage: str) -> dict[str, Any]:
    journal = folder / "sweeps" / stage / "optuna.journal"
    if not journal.is_file():
        return {}
    import optuna

    from windtunnel.sweep.trial import open_storage
    from windtunnel.sweep.view import counts

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=stage, storage=open_storage(f"journal:{journal}"))
    except KeyError:
        return {}
    return {"trials": counts(study)}


def headline(stage: str, r: dict[str, Any]) -> str:
    """One line per finished stage (status output and the report's summary table)."""
    if stage == "mup_search":
        params = ", ".join(f"{k}={v:.4g}" for k, v in r["best_params"].items())
        return f"best {r['best_value']:.4f} with {params}"
    if stage == "lr_transfer":
        c = r.get("check", {})
        if "slope" not in c:
            return f"μTransfer check skipped: {c.get('skipped')}"
        verdict = "stable" if c["stable"] else "NOT stable"
        return f"optimal lr across widths: slope {c['slope']:+.2f}, spread ×{c['spread']:.2f} ({verdict})"
    if stage == "batch_size":
        law = r.get("law", {})
        if "k" not in law:
            return f"batch-size law not fitted: {law.get('skipped')}"
        return f"bs_opt = {law['k']:.3g} / L^{law['gamma']:.3g} tokens"
    if stage == "ladder":
        sizes = sorted({p["model"] for p in r["points"]})
        return f"{len(r['points'])} points from {len(sizes)} sizes ({', '.join(sizes)})"
    if stage == "fit":
        s = r["summary"]
        alloc = next(iter(s["allocation"].values()))
        return (
            f"{s['target']} = {s['E']:.3f} + {s['A']:.3g}/N^{s['alpha']:.3f} + "
            f"{s['B']:.3g}/D^{s['beta']:.3f}; D/N at the budget {alloc['tokens_per_param']:.0f}"
        )
    if stage == "plan":
        return (
            f"{r['N'] / 1e9:.2f}B params × {r['D'] / 1e9:.0f}B tokens, predicted {r['target']} "
            f"{r['loss']:.3f}, {r['gpu_hours']:,.0f} {r['gpu'].upper()}-hours"
        )
    if stage == "backtest":
        return (
            f"held-out largest size: max |error| {r['max_abs_rel_error']:.2%} at "
            f"≥{r['min_extrapolation']:.1f}× the fitted compute"
        )
    return ""
