"""The ``windtunnel`` commands that take Hydra overrides (and ``export``): each parses nothing,
gets typed configs from :mod:`windtunnel.compose`, calls the library and prints; the parser and
:func:`windtunnel.cli.main` (exit codes for bad input, Ctrl-C, SIGTERM, closed pipes) live in
:mod:`windtunnel.cli`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from windtunnel.cli.checks import (
    EXIT_USER_ERROR,
)
from windtunnel.compose import compose_launcher, compose_run, config_groups, split_overrides

EXIT_RUN_FAILED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to resume


def groups_help() -> str:
    lines = ["config groups (pick one with GROUP=OPTION; set fields with GROUP.FIELD=VALUE):"]
    for group, options in config_groups().items():
        lines.append(f"  {group:<10} {', '.join(options)}")
    lines.append("examples:")
    lines.append("  windtunnel train experiment=smoke")
    lines.append("  windtunnel train model=micro_m optim.lr=3e-3 train.tokens_per_param=40")
    lines.append("  windtunnel train 'train.branch_tokens_per_param=[10,20,40]'")
    return "\n".join(lines)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


# -- commands ----------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from windtunnel.data import prepare

    cfg = compose_run(args.overrides)
    corpus = prepare(cfg.data, progress=not os.environ.get("WINDTUNNEL_NO_PROGRESS"))
    emit(
        {
            "root": str(corpus.root),
            "vocab_size": corpus.vocab_size,
            "domains": {
                d.name: {
                    "train_tokens": d.train_tokens,
                    "val_tokens": d.val_tokens,
                    "bytes_per_token": round(d.bytes_per_token, 4),
                }
                for d in corpus.domains
            },
        }
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    own, overrides = split_overrides(args.overrides, ("launcher",))
    cfg = compose_run(overrides)
    launcher = compose_launcher(own) if own else None
    if launcher is not None and launcher.name in ("local", "inline"):
        launcher = None  # this machine: the ranks start here
    if launcher is not None and not args.world_size:  # the job's ranks
        from windtunnel.launch.options import with_ranks

        ranks = with_ranks(launcher, cfg.train.nproc_per_node)
        args.world_size = getattr(ranks, "world_size", 1)
    if args.dry_run:
        return train_dry_run(cfg, args)
    if launcher is not None:  # the run as one job (SLURM: nodes x tasks_per_node ranks)
        refusal = memory_refusal(cfg, args)
        if refusal:  # before anything is submitted
            print(f"windtunnel train: {refusal} (estimated for --gpu {args.gpu})", file=sys.stderr)
            return EXIT_USER_ERROR
        return train_job(cfg, launcher)
    from windtunnel.distributed import World, world_from_env
    from windtunnel.launch.ranks import check_nproc, run_ranks, under_launcher
    from windtunnel.layout import check_world
    from windtunnel.train import train

    nproc = cfg.train.nproc_per_node
    if nproc > 1 and not under_launcher():  # start the ranks; each runs this same command
        check_nproc(nproc, cfg.train.device)
        check_world(cfg, World(size=nproc))
        return run_ranks(nproc, ["train", *args.overrides])
    result = train(cfg, handle_signals=True)
    if not world_from_env().main:  # rank 0 reports for the run
        return {"finished": 0, "preempted": EXIT_PREEMPTED}.get(result.status, EXIT_RUN_FAILED)
    return report_run(result)


def train_job(cfg: Any, launcher: Any) -> int:
    """``windtunnel train ... launcher=slurm``: the run as one job, waited for, reported as a
    local run is (exit 75 when it was preempted and not requeued: rerun to resume)."""
    from windtunnel.train import submit_run

    end = submit_run(cfg, launcher, say=lambda line: print(line, file=sys.stderr))
    if end.failure is None:
        return report_run(end.value)
    how = "was preempted and not requeued (rerun the same command to resume)"
    print(f"job {end.job_id} {how if end.preempted else 'failed'}: {end.failure}", file=sys.stderr)
    return EXIT_PREEMPTED if end.preempted else EXIT_RUN_FAILED


def report_run(result: Any) -> int:
    """Say where the curves are (or why the run stopped), emit its JSON; the exit status."""
    if result.status == "finished":
        where = result.dashboard or result.tracking_uri or f"the journal in {result.run_dir}"
        print(f"loss curves: {where}", file=sys.stderr)
    else:
        print(f"run {result.status}: {result.failure}", file=sys.stderr)
    emit(result.to_json())
    return {"finished": 0, "preempted": EXIT_PREEMPTED}.get(result.status, EXIT_RUN_FAILED)


def memory_refusal(cfg: Any, args: argparse.Namespace) -> str:
    """Why the run cannot fit ``--gpu`` on its ranks ('' when it fits), from the estimate."""
    from windtunnel import estimate
    from windtunnel.config import resolve

    res = resolve(cfg, cfg.data.vocab_size)
    world = args.world_size or cfg.train.nproc_per_node
    return estimate.estimate(res, gpu=args.gpu, world_size=world, mfu=args.mfu).refusal()


def train_dry_run(cfg: Any, args: argparse.Namespace) -> int:
    """Memory and time of the run, from its config alone; exit 2 when it cannot fit."""
    from windtunnel import estimate
    from windtunnel.config import resolve

    res = resolve(cfg, cfg.data.vocab_size)
    world = args.world_size or cfg.train.nproc_per_node
    est = estimate.estimate(res, gpu=args.gpu, world_size=world, mfu=args.mfu)
    print(estimate.table(est), file=sys.stderr)
    emit(est.to_json())
    if not est.fits:
        print(f"windtunnel train: {est.refusal()}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from windtunnel import flops
    from windtunnel.config import model_shape, resolve_model

    cfg = compose_run(args.overrides)
    model = resolve_model(cfg.model, cfg.data.vocab_size)
    shape = model_shape(model)
    n, e = flops.non_embedding_params(shape), flops.embedding_params(shape)
    emit(
        {
            "model": model.name,
            "non_embedding_params": n,
            "embedding_params": e,
            "total_params": n + e,
            "flops_per_token": flops.flops_per_token(shape, cfg.data.seq_len),
            "seq_len": cfg.data.seq_len,
            "flops_convention": flops.FLOPS_CONVENTION,
            "width_mult": model.d_model / model.dim_model_base,
            "shape": {
                k: getattr(model, k)
                for k in (
                    "n_layers",
                    "d_model",
                    "n_heads",
                    "n_kv_heads",
                    "d_head",
                    "d_ff",
                    "vocab_size",
                )
            },
        }
    )
    return 0


def cmd_coordcheck(args: argparse.Namespace) -> int:
    from windtunnel.coordcheck import coordcheck

    cfg = compose_run(args.overrides)
    report = coordcheck(
        cfg, widths=args.widths, steps=args.steps, out=Path(args.out), seeds=args.seeds
    )
    print(report.table(), file=sys.stderr)
    print(f"plot: {report.plot_path}", file=sys.stderr)
    emit(report.to_json())
    return 0 if report.mup_stable else EXIT_RUN_FAILED


def cmd_bench(args: argparse.Namespace) -> int:
    from windtunnel.bench import BENCH_DEFAULTS, run_bench

    cfg = compose_run([*BENCH_DEFAULTS, *args.overrides])
    report = run_bench(
        cfg,
        models=[compose_run([f"model={name}"]).model for name in args.models],
        steps=args.steps,
        baseline=not args.no_baseline,
        compiled=not args.no_compile,
    )
    print(report.table(), file=sys.stderr)
    emit(report.to_json())
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM reached a sweep or tunnel driver: unwound like Ctrl-C (launchers closed, state
    saved, the tunnel's MLflow run marked KILLED), then exit 75: rerun to resume."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (once: a second
    SIGTERM during the unwinding ends the process at once)."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd_sweep(args: argparse.Namespace) -> int:
    from windtunnel.sweep import load_sweep, run_sweep
    from windtunnel.sweep.view import SweepView

    spec = load_sweep(args.spec, args.overrides)
    with stop_on_sigterm():
        summary = run_sweep(spec, view=SweepView(spec.sweep.n_trials, spec.sweep.name))
    for number, reason in sorted(summary.failures.items()):
        print(f"trial {number} failed: {reason}", file=sys.stderr)
    emit(summary.to_json())
    return 0 if summary.n_complete else EXIT_RUN_FAILED


def cmd_replay(args: argparse.Namespace) -> int:
    from windtunnel.tracking import replay_journal

    uri = args.tracking_uri
    if not uri:
        from windtunnel.tracking.server import ensure_server

        uri = ensure_server(compose_run(args.overrides).tracker)
    result = replay_journal(Path(args.path), uri)
    emit({"tracking_uri": uri, **dataclasses.asdict(result)})
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from windtunnel.tracking import server

    cfg = compose_run(args.overrides).tracker
    if args.action == "start":
        emit({"tracking_uri": server.ensure_server(cfg)})
    elif args.action == "stop":
        server.stop_server(Path(cfg.home))
        emit({"stopped": True})
    else:
        emit(dataclasses.asdict(server.server_status(Path(cfg.home), cfg.port)))
    return 0


def _tunnel_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``windtunnel tunnel NAME [overrides]``: NAME picks ``tunnels/NAME.yaml`` (or a path)."""
    name, overrides = args.name, list(args.overrides)
    if name is not None and "=" in name:  # no name given: the first word is an override
        name, overrides = None, [name, *overrides]
    if any(o.startswith("experiment=") for o in overrides):
        raise ValueError(
            "experiment= picks a train config in conf/experiment/; name a tunnel by position: "
            "windtunnel tunnel demo (tunnels/*.yaml lists them)"
        )
    return name, overrides


def cmd_tunnel(args: argparse.Namespace) -> int:
    from windtunnel.tunnel import (
        STAGES,
        TunnelError,
        dry_run,
        load_tunnel,
        print_status,
        run_tunnel,
    )

    unknown = [s for s in args.stage or [] if s not in STAGES]
    if unknown:
        raise ValueError(f"--stage {' '.join(unknown)}: no such stage; stages: {', '.join(STAGES)}")
    name, overrides = _tunnel_args(args)
    spec = load_tunnel(name or "demo", overrides)
    if args.dry_run:
        plan = dry_run(spec)
        print(plan.table(), file=sys.stderr)
        emit(plan.to_json())
        return 0
    try:
        with stop_on_sigterm():
            summary = run_tunnel(spec, only=args.stage)
    except TunnelError as e:
        print(f"windtunnel tunnel: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    print_status(summary)
    if summary.get("report"):
        print(f"report: {summary['report'].get('html')}", file=sys.stderr)
    if summary.get("dashboard"):
        print(f"MLflow (tunnel run, report attached): {summary['dashboard']}", file=sys.stderr)
    if summary.get("charts"):
        print(f"MLflow loss charts of the ladder: {summary['charts']}", file=sys.stderr)
    emit(summary)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from windtunnel.tunnel import list_tunnels, load_tunnel, print_status, status

    name, overrides = _tunnel_args(args)
    if name is None:
        tunnels = list_tunnels(overrides)
        if len(tunnels) != 1:
            for t in tunnels:
                print_status(t)
            emit({"tunnels": tunnels})
            return 0
        name = tunnels[0]["tunnel"]
    summary = status(load_tunnel(name, overrides))
    print_status(summary)
    emit(summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from windtunnel.export import FORMATS, export_hf, export_minicpm_config

    if args.to not in FORMATS:
        raise ValueError(f"--to {args.to!r}: choose one of {', '.join(FORMATS)}")
    source, out = Path(args.source), Path(args.out)
    if args.to == "minicpm-config":
        summary = export_minicpm_config(source, out, force=args.force)
    else:
        tokenizer: Path | bool = Path(args.tokenizer) if args.tokenizer else not args.no_tokenizer
        summary = export_hf(
            source,
            out,
            point=args.point,
            checkpoint_path=Path(args.checkpoint) if args.checkpoint else None,
            tokenizer=tokenizer,
            dtype=args.dtype,
            force=args.force,
        )
        if summary["tokenizer"] is None and tokenizer is True:
            print(
                f"{out}: no tokenizer (the run was trained on pre-tokenized data)", file=sys.stderr
            )
    emit(summary)
    return 0


DELEGATED = {
    "fit": ("windtunnel.cli.fit:fit_main", "fit scaling laws (see `windtunnel fit --help`)"),
    "plan": (
        "windtunnel.cli.fit:plan_main",
        "plan the full run from a fit (`windtunnel plan --help`)",
    ),
}


def delegate(command: str, argv: list[str]) -> int:
    """Commands with their own argparse (options, not Hydra overrides)."""
    import importlib

    module, func = DELEGATED[command][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv))
