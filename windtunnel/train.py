"""One training run: a stable trunk with WSD decay branches, tracked, checkpointed, resumable.

Layout of a run folder (``run_dir/<name>/``)::

    config.json            the resolved config (also logged to MLflow)
    ckpt/<segment>/        latest state of a segment (periodic, on stop, at its end): a DCP
                           checkpoint (see windtunnel.checkpoint), resumable on any world size
    ckpt/fork-<D>/         the trunk at the start of the decay branch that ends at D tokens
    points/<D>.json        finished result of that branch (a rerun skips it)
    result.json            the run's result (a rerun of a finished run just returns it)
    journal.jsonl          every metric point, also when the tracking server is away

A run without branches is a single segment ending in its own decay; with branches the trunk runs
the stable phase, and each branch forks from its checkpoint into its own decay (its own nested
MLflow run, tagged ``wt.point=true``), so a ladder of m budgets costs one run, not m.

On W ranks every rank runs this same code; rank 0 alone writes the run folder's files, MLflow and
the journal, and decides from them (whether a point is done, a checkpoint exists) for all ranks.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from windtunnel import checkpoint
from windtunnel.config import Resolved, RunConfig, resolve, to_dict
from windtunnel.distributed import World, process_group, world_from_env
from windtunnel.engine import (
    Diverged,
    Engine,
    Preempted,
    Pruned,
    pick_device,
    schedule_for,
)
from windtunnel.files import atomic_write, lock
from windtunnel.layout import check_fsdp, check_memory, check_world
from windtunnel.run_files import (
    LAYOUT,
    RUN_FILES_VERSION,
    PointResult,
    TrainResult,
    _Identity,
    _InitialEval,
    _json_write,
    _Logged,
    _Point,
    _read_run_file,
    _Result,
    _result_from_json,
    _versioned,
    check_same_run,
    identity,
    run_name,
)

__all__ = [
    "LAYOUT",
    "RUN_FILES_VERSION",
    "PointResult",
    "TrainResult",
    "check_same_run",
    "identity",
    "run_name",
    "submit_run",
    "train",
]

LN2 = math.log(2.0)
OnEval = Callable[[int, dict[str, float]], None]


def _exclusive(path: Path) -> Any:
    """Hold an exclusive lock on ``path``; wait (saying so) while another process holds it."""
    return lock(
        path,
        on_wait=lambda: print(
            f"waiting for another process training {path.parent}", file=sys.stderr
        ),
    )


def _show_progress(cfg: RunConfig) -> bool:
    """Bars on a terminal only: in log files (CI, SLURM) they would be one endless line."""
    env_off = os.environ.get("WINDTUNNEL_NO_PROGRESS")
    return cfg.train.progress and not env_off and sys.stderr.isatty()


class _Segment:
    """Runs the engine over [start, stop) of one schedule, logging and checkpointing."""

    def __init__(self, trainer: Trainer, name: str, run: Any, point_index: int) -> None:
        self.t, self.name, self.run, self.point_index = trainer, name, run, point_index
        self.ckpt = trainer.dir / "ckpt" / name
        self.logged_file = trainer.dir / "ckpt" / f"{name}.logged.json"
        self.logged = {"train": -1, "eval": -1}
        if trainer.world.main and self.logged_file.exists():
            self.logged = _read_run_file(self.logged_file, _Logged)

    def log(self, step: int, metrics: dict[str, float], group: str) -> None:
        """Log once per (step, group): after a kill, resume replays the same values
        deterministically, so points already sent are skipped instead of duplicated."""
        if step <= self.logged[group] or not self.t.world.main:
            return
        tokens = step * self.t.res.tokens_per_step
        if group == "train" or step == 0:  # once per step: the train log carries the x axes
            metrics = {**metrics, "tokens": tokens, "flops": tokens * self.t.res.flops_per_token}
        self.run.log_metrics(metrics, step=tokens)
        self.logged[group] = step
        _json_write(
            self.logged_file, _versioned(self.logged), fsync=False
        )  # every log step: no fsync

    def evaluate(self, step: int) -> dict[str, float]:
        t = self.t
        metrics = t.eval_metrics()
        self.log(step, metrics, "eval")
        pruned = None
        if t.world.main and t.on_eval is not None and self.name in ("main", "trunk") and step:
            try:
                t.on_eval(step * t.res.tokens_per_step, metrics)
            except Pruned as e:
                pruned = str(e)
        pruned = t.world.decide(pruned)  # rank 0's pruner stops every rank
        if pruned is not None:
            raise Pruned(pruned)
        return metrics

    def train(self, stop: int, forks: dict[int, Path] | None = None) -> None:
        t, res = self.t, self.t.res
        schedule = schedule_for(res, self.point_index)
        every, ckpt_every = res.eval_every_steps, res.checkpoint_every_steps
        log_every = max(1, min(every, res.total_steps // 200 or 1))
        forks = forks or {}
        bar = t.progress_bar(stop)
        window = [0.0, 0]  # seconds, steps since last log

        def on_step(step: int, loss: float, lr: float, seconds: float) -> None:
            window[0] += seconds
            window[1] += 1
            if bar is not None:
                bar.update(res.tokens_per_step)
                if step % log_every == 0:
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if step % log_every == 0 or step == stop:
                tps = window[1] * res.tokens_per_step / max(window[0], 1e-9)
                self.log(
                    step, {"train/loss": loss, "lr": lr, "throughput/tokens_per_s": tps}, "train"
                )
                window[0], window[1] = 0.0, 0
            if step % every == 0 and step != stop:
                self.evaluate(step)
            if step in forks and not t.world.decide(checkpoint.exists(forks[step])):
                t.engine.save(forks[step])
            if ckpt_every and step % ckpt_every == 0:
                t.engine.save(self.ckpt)
                self.run.flush()

        try:
            with t.engine.stop.on_signals(t.handle_signals):
                t.engine.run(schedule, stop, on_step)
        except Preempted:
            t.engine.save(self.ckpt)
            self.run.flush()
            raise
        finally:
            if bar is not None:
                bar.close()
        if stop in forks and not t.world.decide(checkpoint.exists(forks[stop])):
            t.engine.save(forks[stop])
        if stop not in forks and not (ckpt_every and stop % ckpt_every == 0):
            t.engine.save(self.ckpt)  # the segment's final weights (for export)


class Trainer:
    """Owns one run folder; :meth:`run` trains (or resumes) it to its result."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        tracker: Any = None,
        handle_signals: bool = False,
        on_eval: OnEval | None = None,
        world: World | None = None,
    ) -> None:
        from windtunnel.data import BatchSampler, prepare, val_batches

        self.world = world = world or World()
        self.corpus = prepare(cfg.data, progress=_show_progress(cfg) and world.main)
        self.res: Resolved = resolve(cfg, self.corpus.vocab_size)
        self.cfg = self.res.cfg
        self.name = run_name(cfg)
        self.dir = Path(cfg.run_dir) / self.name
        self.handle_signals = handle_signals
        self.on_eval = on_eval
        micro = check_world(self.cfg, world)
        if not world.main:
            from windtunnel.tracking import NullTracker

            tracker = NullTracker()  # rank 0 alone records the run
        elif tracker is None:
            from windtunnel.tracking import open_tracker

            tracker = open_tracker(cfg.tracker)
        self.tracker = tracker
        sampler = BatchSampler(
            self.corpus,
            seq_len=cfg.data.seq_len,
            batch_size=cfg.optim.batch_size,
            seed=cfg.train.seed,
        )
        mine = world.share(micro)  # this rank's rows of each micro-batch

        def sample(step: int, m: int) -> tuple[Any, Any]:
            start = m * micro
            return sampler.batch(step, rows=slice(start + mine.start, start + mine.stop))

        check_memory(self.res, world)
        check_fsdp(self.res, world)
        self.engine = Engine.build(self.res, sample, world)

        def val_sets(n_tokens: int) -> dict[str, list[tuple[Any, Any]]]:
            return {
                d.name: val_batches(
                    self.corpus,
                    d.name,
                    seq_len=cfg.data.seq_len,
                    n_tokens=n_tokens,
                    batch_size=micro,
                )
                for d in self.corpus.domains
            }

        self.val = val_sets(cfg.train.eval_tokens)  # small and cheap: the curves, the pruner
        # every finished point: the whole validation split (or final_eval_tokens per domain)
        final = cfg.train.final_eval_tokens
        self.val_final = self.val if final == cfg.train.eval_tokens else val_sets(final or 1 << 62)
        self.bytes_per_token = {d.name: d.bytes_per_token for d in self.corpus.domains}
        self.initial_val_loss = math.nan

    # -- helpers ---------------------------------------------------------------------------------
    def eval_metrics(self, *, final: bool = False) -> dict[str, float]:
        losses = self.engine.evaluate(self.val_final if final else self.val)
        out: dict[str, float] = {}
        for d, loss in losses.items():
            out[f"val_loss/{d}"] = loss
            out[f"val_bpb/{d}"] = loss / LN2 / self.bytes_per_token[d]
        out["val_loss"] = sum(losses.values()) / len(losses)
        out["val_bpb"] = sum(out[f"val_bpb/{d}"] for d in losses) / len(losses)
        return out

    def progress_bar(self, stop: int) -> Any:
        if not _show_progress(self.cfg) or not self.world.main:
            return None
        from tqdm import tqdm

        tps = self.res.tokens_per_step
        return tqdm(
            total=stop * tps,
            initial=self.engine.step * tps,
            unit="tok",
            unit_scale=True,
            desc=self.name,
            dynamic_ncols=True,
        )

    def tags(self, **extra: str) -> dict[str, str]:
        c = self.cfg
        return {
            "wt.stage": c.stage,
            "wt.model": c.model.name,
            "wt.N": str(self.res.non_embedding_params),
            "wt.width": str(c.model.d_model),
            "wt.batch_tokens": str(self.res.tokens_per_step),
            "wt.seed": str(c.train.seed),
            "wt.mup": str(c.model.mup).lower(),
            **c.tags,
            **extra,
        }

    def params(self) -> dict[str, Any]:
        from windtunnel.provenance import provenance

        return {**to_dict(self.cfg), "resolved": self.res.summary(), "provenance": provenance()}

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to the result; one process per run folder (a second one waits, then reuses)."""
        from windtunnel.launch.checkpoint import stop_on_preempt

        main = self.world.main
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
        # under a requeueable SLURM job, preemption stops at the next step boundary (checkpointed)
        held = _exclusive(self.dir / "run.lock") if main else nullcontext()
        with held, stop_on_preempt(self.engine.stop.request):
            return self._run_locked()

    def _run_locked(self) -> TrainResult:
        done = self.dir / "result.json"
        finished = None
        if self.world.main:
            finished = self._prepare_folder(done)
        finished = self.world.decide(finished)  # the other ranks wait for rank 0's folder
        if finished is not None:
            return _result_from_json(finished)
        started = time.time()
        kind = "trunk" if self.res.branching else "run"
        parent = self.tracker.start_run(
            run_dir=self.dir,
            name=self.name,
            experiment=self.cfg.tracker.experiment,
            params=self.params(),
            tags=self.tags(**{"wt.kind": kind, "wt.point": str(not self.res.branching).lower()}),
            parent=self.cfg.tracker.parent_run_id or None,
        )
        parent.log_dict(self.params(), "config.json")
        try:
            result = self._run(parent)
        except Diverged as e:
            result = self._failed("diverged", str(e), parent)
        except Pruned as e:
            parent.set_tags({"wt.pruned": "true"})
            parent.finish("KILLED", error=f"pruned: {e}")
            result = self._summary(parent, "pruned", [], failure=str(e))
        except Preempted as e:
            parent.flush()
            return self._summary(parent, "preempted", [], failure=str(e))
        result.seconds = time.time() - started
        if result.status == "finished":
            parent.finish("FINISHED")
        if self.world.main:
            _json_write(done, _versioned(result.to_json()))
        return result

    def _prepare_folder(self, done: Path) -> dict[str, Any] | None:
        """Rank 0: check and set up the run folder; a finished run's result, else None."""
        if self.cfg.resume and (self.dir / "identity.json").exists():
            saved = _read_run_file(self.dir / "identity.json", _Identity)
            check_same_run(saved, self.cfg, self.dir)
        if self.cfg.resume and done.exists():
            return _read_run_file(done, _Result)
        if not self.cfg.resume:  # start over: clear everything but the lock we hold
            import shutil

            for child in self.dir.iterdir():
                if child.name != "run.lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        _json_write(self.dir / "config.json", {**to_dict(self.cfg), "resolved": self.res.summary()})
        _json_write(self.dir / "identity.json", _versioned(identity(self.cfg)))
        if self.corpus.tokenizer_path is not None:  # the run's tokenizer travels with it (export)
            atomic_write(self.dir / "tokenizer.json", self.corpus.tokenizer_path.read_text())
        return None

    def _failed(self, status: str, reason: str, parent: Any) -> TrainResult:
        parent.set_tags({"wt.failure": status, "wt.failure_reason": reason[:5000]})
        parent.finish("FAILED", error=f"{status}: {reason}")
        return self._summary(parent, status, [], failure=reason)

    def _initial_eval(self, seg: _Segment) -> float:
        path = self.dir / "initial_eval.json"
        saved = self.world.decide(_read_run_file(path, _InitialEval) if path.exists() else None)
        if saved is None:
            saved = seg.evaluate(0)
            if self.world.main:
                _json_write(path, _versioned(saved))
        self.initial_val_loss = float(saved["val_loss"])
        return self.initial_val_loss

    def _run(self, parent: Any) -> TrainResult:
        res = self.res
        if not res.branching:
            seg = _Segment(self, "main", parent, 0)
            self._resume(seg, None)
            initial = self._initial_eval(seg)
            seg.train(res.points[0].total_steps)
            point = self._finish_point(seg, 0, parent.run_id)
            return self._summary(parent, "finished", [point], initial=initial)

        trunk = _Segment(self, "trunk", parent, len(res.points) - 1)
        forks = {p.decay_start: self.dir / "ckpt" / f"fork-{p.tokens}" for p in res.points}
        trunk_stop = res.points[-1].decay_start
        points: list[PointResult] = []
        initial = self._initial_eval(trunk)
        if not self.world.decide(all(checkpoint.exists(f) for f in forks.values())):
            self._resume(trunk, None)
            trunk.train(trunk_stop, forks)
            trunk.run.flush()
        for i, p in enumerate(res.points):
            saved = self.dir / "points" / f"{p.tokens}.json"
            done = self.world.decide(_read_run_file(saved, _Point) if saved.exists() else None)
            if done is not None:
                points.append(PointResult(**done))
                continue
            child = self.tracker.start_run(
                run_dir=self.dir / "branches" / str(p.tokens),
                name=f"{self.name}-D{p.tokens}",
                experiment=self.cfg.tracker.experiment,
                params=self.params(),
                tags=self.tags(**{"wt.kind": "branch", "wt.point": "true", "wt.D": str(p.tokens)}),
                parent=parent,
            )
            seg = _Segment(self, f"branch-{p.tokens}", child, i)
            try:
                self._resume(seg, forks[p.decay_start])
                seg.train(p.total_steps)
            except Diverged as e:
                child.set_tags({"wt.failure": "diverged", "wt.failure_reason": str(e)[:5000]})
                child.finish("FAILED", error=f"diverged: {e}")
                raise
            point = self._finish_point(seg, i, child.run_id)
            child.finish("FINISHED")
            if self.world.main:
                _json_write(saved, _versioned(asdict(point)))
            points.append(point)
        return self._summary(parent, "finished", points, initial=initial)

    def _resume(self, seg: _Segment, start: Path | None) -> None:
        """Continue a segment from its own checkpoint, else from ``start``, else from init."""
        if self.world.decide(checkpoint.exists(seg.ckpt)):
            self.engine.load(seg.ckpt)
        elif start is not None:
            self.engine.load(start)

    def _finish_point(self, seg: _Segment, i: int, run_id: str) -> PointResult:
        res, step = self.res, self.engine.step
        assert step == res.points[i].total_steps, (step, res.points[i])
        tokens = step * res.tokens_per_step
        metrics = self.eval_metrics(final=True)
        metrics["N"] = res.non_embedding_params
        seg.log(step, metrics, "eval")
        seg.run.flush()
        domains = {
            d: {"loss": metrics[f"val_loss/{d}"], "bpb": metrics[f"val_bpb/{d}"]} for d in self.val
        }
        return PointResult(
            tokens=tokens,
            N=res.non_embedding_params,
            D=tokens,
            flops=float(tokens * res.flops_per_token),
            val_loss=metrics["val_loss"],
            val_bpb=metrics["val_bpb"],
            domains=domains,
            run_id=run_id,
        )

    def _summary(
        self,
        parent: Any,
        status: str,
        points: list[PointResult],
        *,
        initial: float | None = None,
        failure: str | None = None,
    ) -> TrainResult:
        last = points[-1] if points else None
        tokens = self.engine.step * self.res.tokens_per_step
        dashboard = ""
        if self.tracker.tracking_uri and getattr(parent, "experiment_id", None):
            from windtunnel.tracking import mlflow_ui_url

            dashboard = mlflow_ui_url(self.tracker.tracking_uri, parent.experiment_id)
        return TrainResult(
            status=status,
            failure=failure,
            run_id=parent.run_id,
            tracking_uri=self.tracker.tracking_uri,
            run_dir=str(self.dir),
            N=self.res.non_embedding_params,
            tokens=last.tokens if last else tokens,
            flops=last.flops if last else float(tokens * self.res.flops_per_token),
            initial_val_loss=self.initial_val_loss if initial is None else initial,
            val_loss=last.val_loss if last else math.nan,
            val_bpb=last.val_bpb if last else math.nan,
            points=points,
            dashboard=dashboard,
        )


def train(
    cfg: RunConfig,
    *,
    tracker: Any = None,
    handle_signals: bool = False,
    on_eval: OnEval | None = None,
) -> TrainResult:
    """Train (or resume) one run to its result. Config errors raise ``ValueError``; divergence,
    pruning and preemption come back as the result's ``status`` (recorded in the tracker).
    ``on_eval(tokens, metrics)`` sees every evaluation of the stable trunk and may raise
    :class:`~windtunnel.engine.Pruned`."""
    world = world_from_env()
    with process_group(world, pick_device(cfg.train.device, world)):
        trainer = Trainer(
            cfg, tracker=tracker, handle_signals=handle_signals, on_eval=on_eval, world=world
        )
        try:
            return trainer.run()
        finally:  # DDP's reducer must go before its process group, or its destructor can hang
            del trainer
            gc.collect()


def submit_run(cfg: RunConfig, options: Any, *, say: Callable[[str], None] = print) -> Any:
    """The run as one job of the launcher of ``options`` (SLURM: ``nodes * tasks_per_node``
    ranks, by default one per GPU; ``train.nproc_per_node`` sets the tasks per node), waited
    for: a :class:`~windtunnel.launch.job.JobEnd` whose value is rank 0's :class:`TrainResult`.
    A layout the launcher cannot start, or that cannot split the batch, is refused here."""
    from windtunnel.launch.job import run_job
    from windtunnel.launch.options import with_ranks

    options = with_ranks(options, cfg.train.nproc_per_node)
    check_world(cfg, World(size=getattr(options, "world_size", 1)))
    return run_job(options, train, cfg, say=say)
