"""The ``windtunnel`` command. Thin: parse, compose the Hydra config, call the library, print.

Commands that run things take Hydra overrides (``windtunnel train model=micro_m optim.lr=3e-3``)
and print, as their last stdout line, one JSON object. Heavy imports (torch, mlflow) happen
inside the commands so that ``windtunnel --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to resume


def conf_dir() -> Path:
    path = Path(os.environ.get("WINDTUNNEL_CONF", REPO_CONF))
    if not (path / "config.yaml").exists():
        raise ValueError(
            f"no config.yaml under {path}: run from a windtunnel checkout (pip install -e .) "
            "or set WINDTUNNEL_CONF to a folder holding the conf/ groups"
        )
    return path


def config_groups() -> dict[str, list[str]]:
    """Group → options, read from the conf folder (cheap: no Hydra import)."""
    try:
        root = conf_dir()
    except ValueError:
        return {}
    return {
        g.name: sorted(p.stem for p in g.glob("*.yaml"))
        for g in sorted(root.iterdir())
        if g.is_dir()
    }


def groups_help() -> str:
    lines = ["config groups (pick one with GROUP=OPTION; set fields with GROUP.FIELD=VALUE):"]
    for group, options in config_groups().items():
        lines.append(f"  {group:<10} {', '.join(options)}")
    lines.append("examples:")
    lines.append("  windtunnel train experiment=smoke")
    lines.append("  windtunnel train model=micro_m optim.lr=3e-3 train.tokens_per_param=40")
    lines.append("  windtunnel train 'train.branch_tokens_per_param=[10,20,40]'")
    return "\n".join(lines)


def compose(overrides: Sequence[str]) -> Any:
    """Hydra overrides → :class:`RunConfig` (raises ValueError with Hydra's message)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from windtunnel.config import register_configs, to_run_config

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides))
        return to_run_config(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"bad config or override: {e}".strip()) from None


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


# -- commands ----------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from windtunnel.data import prepare

    cfg = compose(args.overrides)
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
    from windtunnel.train import train

    cfg = compose(args.overrides)
    result = train(cfg, handle_signals=True)
    if result.status == "finished":
        where = result.dashboard or result.tracking_uri or f"the journal in {result.run_dir}"
        print(f"loss curves: {where}", file=sys.stderr)
    else:
        print(f"run {result.status}: {result.failure}", file=sys.stderr)
    emit(result.to_json())
    return {"finished": 0, "preempted": EXIT_PREEMPTED}.get(result.status, EXIT_RUN_FAILED)


def cmd_params(args: argparse.Namespace) -> int:
    from windtunnel import flops
    from windtunnel.config import model_shape, resolve_model

    cfg = compose(args.overrides)
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

    cfg = compose(args.overrides)
    report = coordcheck(
        cfg, widths=args.widths, steps=args.steps, out=Path(args.out), seeds=args.seeds
    )
    print(report.table(), file=sys.stderr)
    print(f"plot: {report.plot_path}", file=sys.stderr)
    emit(report.to_json())
    return 0 if report.mup_stable else EXIT_RUN_FAILED


def cmd_bench(args: argparse.Namespace) -> int:
    from windtunnel.bench import BENCH_DEFAULTS, run_bench

    cfg = compose([*BENCH_DEFAULTS, *args.overrides])
    report = run_bench(
        cfg,
        models=args.models,
        steps=args.steps,
        baseline=not args.no_baseline,
        compiled=not args.no_compile,
    )
    print(report.table(), file=sys.stderr)
    emit(report.to_json())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from windtunnel.sweep import load_sweep, run_sweep
    from windtunnel.sweep.view import SweepView

    spec = load_sweep(args.spec, args.overrides)
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

        uri = ensure_server(compose(args.overrides).tracker)
    result = replay_journal(Path(args.path), uri)
    emit({"tracking_uri": uri, **dataclasses.asdict(result)})
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from windtunnel.tracking import server

    cfg = compose(args.overrides).tracker
    if args.action == "start":
        emit({"tracking_uri": server.ensure_server(cfg)})
    elif args.action == "stop":
        server.stop_server(Path(cfg.home))
        emit({"stopped": True})
    else:
        emit(dataclasses.asdict(server.server_status(Path(cfg.home), cfg.port)))
    return 0


def _tunnel_args(overrides: list[str]) -> tuple[str, list[str]]:
    """``experiment=NAME`` picks ``tunnels/NAME.yaml`` (default: the demo); the rest override."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    return (names[-1] if names else "demo"), [
        o for o in overrides if not o.startswith("experiment=")
    ]


def cmd_tunnel(args: argparse.Namespace) -> int:
    from windtunnel.tunnel import TunnelError, dry_run, load_tunnel, print_status, run_tunnel

    experiment, overrides = _tunnel_args(args.overrides)
    tf = load_tunnel(experiment, overrides)
    if args.dry_run:
        plan = dry_run(tf)
        print(plan.table(), file=sys.stderr)
        emit(plan.to_json())
        return 0
    try:
        summary = run_tunnel(tf, only=args.stage)
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

    experiment, overrides = _tunnel_args(args.overrides)
    if not any(o.startswith("experiment=") for o in args.overrides):
        tunnels = list_tunnels(overrides)
        if len(tunnels) != 1:
            for t in tunnels:
                print_status(t)
            emit({"tunnels": tunnels})
            return 0
        experiment = tunnels[0]["tunnel"]
    summary = status(load_tunnel(experiment, overrides))
    print_status(summary)
    emit(summary)
    return 0


DELEGATED = {
    "fit": ("windtunnel.scaling.cli:fit_main", "fit scaling laws (see `windtunnel fit --help`)"),
    "plan": (
        "windtunnel.scaling.cli:plan_main",
        "plan the full run from a fit (`windtunnel plan --help`)",
    ),
}


def _delegate(command: str, argv: list[str]) -> int:
    """Commands with their own argparse (options, not Hydra overrides)."""
    import importlib

    module, func = DELEGATED[command][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv))


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="windtunnel",
        description=(
            "Model wind tunnels for LM pretraining: train tiny μP proxies with WSD decay "
            "branches, sweep them, fit scaling laws, plan the full run."
        ),
        epilog=groups_help(),
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable, helptext: str, *first: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name, help=helptext, description=helptext, epilog=groups_help(), formatter_class=fmt
        )
        for positional in first:  # positionals that come before the overrides
            if positional == "action":
                sp.add_argument(positional, choices=["start", "stop", "status"])
            else:
                sp.add_argument(positional, help="a sweep spec, e.g. sweeps/smoke.yaml")
        sp.add_argument(
            "overrides", nargs="*", help="Hydra overrides, e.g. model=micro_m optim.lr=3e-3"
        )
        sp.set_defaults(func=func)
        return sp

    add("prepare", cmd_prepare, "build the corpus: tokenizer, token memmaps, bytes per token")
    add("train", cmd_train, "train (or resume) one proxy run; last stdout line is JSON")
    add("params", cmd_params, "print parameter and FLOP counts of a model config as JSON")
    cc = add("coordcheck", cmd_coordcheck, "μP coordinate check across widths (exit 3 if unstable)")
    cc.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    cc.add_argument("--steps", type=int, default=8)
    cc.add_argument("--seeds", type=int, default=2)
    cc.add_argument("--out", default=".windtunnel/coordcheck", help="folder for the plot")
    b = add("bench", cmd_bench, "training throughput vs this machine's matmul peak")
    b.add_argument("--models", nargs="+", default=["micro_s", "micro_m", "micro_l"])
    b.add_argument("--steps", type=int, default=30)
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
    r.add_argument("--path", default=".windtunnel/runs", help="a journal.jsonl or a folder of runs")
    r.add_argument("--tracking-uri", default="", help="default: the local server of tracker config")
    add("server", cmd_server, "start, stop or show the local MLflow server", "action")
    t = add(
        "tunnel",
        cmd_tunnel,
        "run or resume a whole wind tunnel: windtunnel tunnel experiment=demo "
        "[launcher=slurm tunnel.ladder.set=[...] ...]; tunnels/*.yaml lists them",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (trials, jobs, tokens, GPU-hours); run nothing",
    )
    t.add_argument(
        "--stage", nargs="+", default=None, help="run only these stages (e.g. --stage fit plan)"
    )
    add("status", cmd_status, "where a tunnel stands: windtunnel status [experiment=demo]")
    for name, (_, helptext) in DELEGATED.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"windtunnel {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
