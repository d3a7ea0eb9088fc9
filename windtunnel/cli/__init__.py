"""The ``windtunnel`` command. Thin: parse arguments, ask :mod:`windtunnel.compose` for typed
configs, call the library, print. No library module imports this one.

Commands that run things take Hydra overrides (``windtunnel train model=micro_m optim.lr=3e-3``)
and print, as their last stdout line, one JSON object. Heavy imports (torch, mlflow) happen
inside the commands so that ``windtunnel --help`` answers at once.

Bad input is refused where it enters: every numeric and path option has a check from
:mod:`windtunnel.cli.checks` (its range shown by ``--help``), and :func:`main` turns the library's
user errors (``ValueError`` and its kin, see :data:`USER_ERRORS`) into one stderr line and exit 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from windtunnel.cli.checks import (
    EXIT_USER_ERROR,
    Parser,
    count,
    existing_path,
    fraction,
    one_line,
    out_dir,
    say,
    tracking_uri,
)
from windtunnel.compose import compose_launcher, compose_run, config_groups, split_overrides
from windtunnel.estimate import GPUS

EXIT_RUN_FAILED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to resume
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a pipe's reader closing early does to C programs
EXIT_INTERRUPTED = 130  # 128 + SIGINT
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,  # the library's "bad input" (ScalingError, config checks, Hydra's messages)
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ConnectionError,  # a tracking server that does not answer
)
"""Exceptions that mean the input (or its surroundings) is wrong: one line, exit 2. Anything else
is a bug and keeps its traceback."""


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


def _delegate(command: str, argv: list[str]) -> int:
    """Commands with their own argparse (options, not Hydra overrides)."""
    import importlib

    module, func = DELEGATED[command][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv))


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> Parser:
    p = Parser(
        prog="windtunnel",
        description=(
            "Model wind tunnels for LM pretraining: train tiny μP proxies with WSD decay "
            "branches, sweep them, fit scaling laws, plan the full run."
        ),
        epilog=groups_help(),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p.commands = sub.choices  # name → its parser

    def add(name: str, func: Callable, helptext: str, *first: str) -> Parser:
        sp: Parser = sub.add_parser(name, help=helptext, description=helptext, epilog=groups_help())
        for positional in first:  # positionals that come before the overrides
            if positional == "action":
                sp.add_argument(positional, choices=["start", "stop", "status"])
            elif positional == "name":
                sp.add_argument(
                    "name", nargs="?", help="a tunnel: tunnels/NAME.yaml or a path (default: demo)"
                )
            else:
                sp.add_argument(positional, help="a sweep spec, e.g. sweeps/smoke.yaml")
        sp.add_argument(
            "overrides", nargs="*", help="Hydra overrides, e.g. model=micro_m optim.lr=3e-3"
        )
        sp.set_defaults(func=func)
        return sp

    add("prepare", cmd_prepare, "build the corpus: tokenizer, token memmaps, bytes per token")
    tr = add("train", cmd_train, "train (or resume) one proxy run; last stdout line is JSON")
    tr.add_argument(
        "--dry-run",
        action="store_true",
        help="print memory per rank (ddp and fsdp), tokens/s, wall-clock and GPU-hours; train "
        "nothing; exit 2 when the run cannot fit the GPU's memory, saying what to change",
    )
    tr.add_argument(
        "--gpu",
        default="h100",
        choices=list(GPUS),
        help="the GPU kind of --dry-run, and of the memory check before a SLURM job is submitted",
    )
    tr.add_argument(
        "--world-size",
        type=count(1),
        default=None,
        help="with --dry-run: GPUs of the run (default: train.nproc_per_node)",
    )
    tr.add_argument(
        "--mfu",
        type=fraction(closed_hi=True),
        default=None,
        help="with --dry-run: model FLOPs utilisation (default 0.40 compiled, 0.20 eager)",
    )
    add("params", cmd_params, "print parameter and FLOP counts of a model config as JSON")
    cc = add("coordcheck", cmd_coordcheck, "μP coordinate check across widths (exit 3 if unstable)")
    cc.add_argument(
        "--widths",
        type=count(1),
        nargs="+",
        default=[64, 128, 256, 512],
        help="at least 3 model widths, each a multiple of model.d_head",
    )
    cc.add_argument("--steps", type=count(1), default=8, help="training steps per width")
    cc.add_argument("--seeds", type=count(1), default=2, help="seeds averaged per width")
    cc.add_argument(
        "--out", type=out_dir, default=Path(".windtunnel/coordcheck"), help="folder for the plot"
    )
    b = add("bench", cmd_bench, "training throughput vs this machine's matmul peak")
    b.add_argument(
        "--models",
        nargs="+",
        default=["micro_s", "micro_m", "micro_l"],
        choices=config_groups().get("model") or None,
        metavar="MODEL",
        help="model configs to measure (conf/model/*.yaml)",
    )
    b.add_argument("--steps", type=count(1), default=30, help="timed steps per model")
    b.add_argument(
        "--no-baseline", action="store_true", help="skip the plain PyTorch reference loop"
    )
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    add(
        "sweep",
        cmd_sweep,
        "run or resume a sweep: windtunnel sweep sweeps/smoke.yaml [launcher=slurm sweep.n_trials=64]",
        "spec",
    )
    r = add(
        "replay", cmd_replay, "send run journals (JSONL) to MLflow, e.g. after the server was down"
    )
    r.add_argument(
        "--path",
        type=existing_path,
        default=Path(".windtunnel/runs"),
        help="a journal.jsonl or a folder of runs (default: .windtunnel/runs)",
    )
    r.add_argument(
        "--tracking-uri",
        type=tracking_uri,
        default="",
        help="default: the local server of tracker config",
    )
    add("server", cmd_server, "start, stop or show the local MLflow server", "action")
    t = add(
        "tunnel",
        cmd_tunnel,
        "run or resume a whole wind tunnel: windtunnel tunnel demo "
        "[launcher=slurm tunnel.ladder.set=[...] ...]; tunnels/*.yaml lists them",
        "name",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (trials, jobs, tokens, GPU-hours); run nothing",
    )
    t.add_argument(
        "--stage", nargs="+", default=None, help="run only these stages (e.g. --stage fit plan)"
    )
    add("status", cmd_status, "where a tunnel stands: windtunnel status [demo]", "name")
    e = sub.add_parser(
        "export",
        help="write a run's model as a Hugging Face Llama folder, or a MiniCPM config.json",
        description=(
            "--to hf: RUN_DIR's finished model (main, or the largest decay branch) as a "
            "LlamaForCausalLM folder that plain transformers loads (μP multipliers folded into "
            "the weights), with the run's tokenizer. --to minicpm-config: MiniCPM's config.json "
            "for the model of a run folder or of a planned experiment YAML (windtunnel plan --out)."
        ),
        epilog="examples:\n  windtunnel export .windtunnel/runs/micro_s-... --to hf exported/\n"
        "  windtunnel export conf/experiment/full.yaml --to minicpm-config full-config/",
    )
    e.add_argument(
        "source",
        metavar="RUN_DIR",
        type=existing_path,
        help="a run folder (or, for minicpm-config, a plan)",
    )
    e.add_argument(
        "out", metavar="OUT", type=out_dir, help="the folder to write (must be empty, or --force)"
    )
    e.add_argument("--to", default="hf", help="hf (default) or minicpm-config")
    which = e.add_mutually_exclusive_group()
    which.add_argument(
        "--point",
        type=count(1),
        default=None,
        metavar="D",
        help="the decay branch ending at D tokens (2000000 or 2e6)",
    )
    which.add_argument(
        "--checkpoint",
        type=existing_path,
        default=None,
        help="any checkpoint folder (or legacy .pt)",
    )
    toks = e.add_mutually_exclusive_group()
    toks.add_argument(
        "--tokenizer",
        type=existing_path,
        default=None,
        help="a tokenizer.json or prepared corpus folder",
    )
    toks.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    e.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    e.add_argument("--force", action="store_true", help="replace OUT if it holds something")
    e.set_defaults(func=cmd_export)
    for name, (_, helptext) in DELEGATED.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; a mistake is one line naming the command it belongs to, exit 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.commands.get(args.command, parser)
        dashed = [x for x in extra if x.startswith("-") and "=" in x]
        hint = (
            f" (Hydra overrides take no dashes: {dashed[0].lstrip('-')})"
            if dashed and args.command in OVERRIDES
            else ""
        )
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


OVERRIDES = ("prepare", "train", "params", "coordcheck", "bench", "sweep", "replay", "server",
             "tunnel", "status")  # fmt: skip
"""Commands that take Hydra overrides."""


def main(argv: Sequence[str] | None = None) -> int:
    """``windtunnel``: the exit status. Bad input is one line on stderr and 2, never a
    traceback; Ctrl-C is one line and 130; a reader that closes the pipe early (``| head``)
    ends the command quietly (141); SIGTERM to a sweep or tunnel is one line and 75."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in (*OVERRIDES, "export", *DELEGATED) else ""
    prog = f"windtunnel {command}".strip()
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except SystemExit as e:  # argparse: --help (0) or a mistake already said in one line (2)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        raise
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except Terminated:
        say(f"{prog}: stopped by SIGTERM; what finished is kept: rerun the same command to resume")
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        resume = "; rerun the same command to resume" if command in ("sweep", "tunnel") else ""
        say(f"{prog}: interrupted{resume}")
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        say(f"{prog}: error: {one_line(str(e)) or type(e).__name__}")
        return EXIT_USER_ERROR


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = parse(argv)
    return int(args.func(args))


def _stdout_to_devnull() -> None:
    """Python's recipe for SIGPIPE: point stdout at /dev/null so that the interpreter's last
    flush at exit does not raise again."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no real fd (tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
