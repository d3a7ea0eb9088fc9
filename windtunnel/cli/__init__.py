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
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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
from windtunnel.cli.commands import (
    DELEGATED,
    EXIT_PREEMPTED,
    Terminated,
    cmd_bench,
    cmd_coordcheck,
    cmd_export,
    cmd_params,
    cmd_prepare,
    cmd_replay,
    cmd_server,
    cmd_status,
    cmd_sweep,
    cmd_train,
    cmd_tunnel,
    delegate,
    groups_help,
)
from windtunnel.compose import config_groups
from windtunnel.estimate import GPUS

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
    e.add_argument(
        "--to", default="hf", choices=("hf", "minicpm-config"), help="what to write (default hf)"
    )
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
    e.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights' dtype (default float32)",
    )
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
        return delegate(argv[0], argv[1:])
    args = parse(argv)
    return int(args.func(args))


def _stdout_to_devnull() -> None:
    """Python's recipe for SIGPIPE: point stdout at /dev/null so that the interpreter's last
    flush at exit does not raise again."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no real fd (tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
