"""``windtunnel fit`` and ``windtunnel plan`` (argparse; the main CLI dispatches here).

Both return an exit code. User errors print one line on stderr and return 2, no traceback.

The CLI layer of :mod:`windtunnel.scaling`: with an MLflow experiment as input it reads the
points through :mod:`windtunnel.tracking.runs`, imported inside the ``_mlflow_*`` functions only
(the rest of ``scaling`` never imports ``windtunnel.tracking`` or mlflow).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from windtunnel.cli.checks import (
    Parser,
    WrappingHelpFormatter,
    count,
    existing_path,
    fraction,
    in_range,
    numbers,
    out_dir,
    out_file,
    positive,
    say,
    tracking_uri,
)
from windtunnel.scaling.errors import ConvergenceError, InputError, ScalingError

if TYPE_CHECKING:
    import pandas as pd

    from windtunnel.scaling.batch_lr import BatchSizeLaw

FIT_EPILOG = """\
examples:
  windtunnel fit --input points.csv --json
  windtunnel fit --input chinchilla.csv --n-col "Model Size" --c-col "Training FLOP" --drop-highest 5
  windtunnel fit --input ladder --target bpb --form minicpm --out runs/fit   # MLflow experiment
  windtunnel plan --fit runs/fit/fit.json --budget-flops 1e21 --gpu h100 --mfu 0.4 \\
      --out conf/experiment/full.yaml
"""


BUDGET = in_range(0, 1e30, open_lo=True)
"""A compute budget in FLOPs (the largest runs to date are ~1e26)."""


def _fit_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="windtunnel fit",
        description=(
            "Fit the data–model law L = E + A/N^α + B/D^β (Huber on log residuals, robust "
            "global optimizer) to finished points, with bootstrap intervals for every "
            "parameter and the compute-optimal allocation."
        ),
        epilog=FIT_EPILOG,
    )
    p.add_argument(
        "--input",
        required=True,
        help="a .csv/.parquet file, or an MLflow experiment name or id (points tagged wt.point)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        type=tracking_uri,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else http://127.0.0.1:5055)",
    )
    p.add_argument(
        "--form",
        choices=("chinchilla", "minicpm"),
        default="chinchilla",
        help="chinchilla: E, A, B, α, β (raw units); minicpm: also C_N, C_D, L0 with N, D in "
        "billions (same law)",
    )
    p.add_argument(
        "--target",
        default="loss",
        help="column to fit: loss (default), bpb (tokenizer-independent), loss/<domain>, …",
    )
    g = p.add_argument_group("column mapping (for tables with other column names)")
    g.add_argument("--n-col", default=None, help="column holding N (non-embedding params)")
    g.add_argument("--d-col", default=None, help="column holding D (tokens)")
    g.add_argument("--c-col", default=None, help="column holding C (FLOPs); D = C/(k·N) if no D")
    g.add_argument("--loss-col", default=None, help="column holding the target values")
    g.add_argument(
        "--flops-per-param-token",
        type=positive(),
        default=6.0,
        help="k in C = k·N·D when one of C, D is derived (default 6)",
    )
    s = p.add_argument_group("selection")
    s.add_argument("--stage", default=None, help="keep rows whose `stage` equals this")
    s.add_argument("--query", default=None, help="pandas query to select rows, e.g. 'N > 1e7'")
    s.add_argument(
        "--drop-highest", type=count(0), default=0, metavar="K", help="drop the K highest-loss rows"
    )
    o = p.add_argument_group("fit and intervals")
    o.add_argument("--delta", type=positive(), default=1e-3, help="Huber δ on log residuals")
    o.add_argument(
        "--maxiter",
        type=count(1),
        default=2000,
        metavar="N",
        help="iteration cap of each local search of the fit (default 2000; raise it when the "
        "fit stops before converging)",
    )
    o.add_argument("--reduction", choices=("mean", "sum"), default="mean", help=argparse.SUPPRESS)
    o.add_argument("--bootstrap", type=count(0), default=200, metavar="N", help="refits (0: none)")
    o.add_argument("--seed", type=count(0), default=0, help="bootstrap seed (recorded)")
    o.add_argument("--level", type=fraction(), default=0.95, help="interval mass (default 0.95)")
    o.add_argument(
        "--budget",
        type=BUDGET,
        action="append",
        default=None,
        metavar="FLOPS",
        help="budget(s) for N_opt, D_opt, D/N (repeatable; default 1e21)",
    )
    bt = p.add_argument_group(
        "back-test (fit small sizes, predict larger ones, with prediction intervals and coverage)"
    )
    bt.add_argument(
        "--backtest",
        choices=("rollout", "largest", "each"),
        default=None,
        help="rollout: fit the k smallest sizes, predict every larger one, for every k ≥ 3; "
        "largest: hold out the largest size; each: leave each size out. Prints every held-out "
        "point with its interval and the coverage (without this option: largest, summary only)",
    )
    bt.add_argument(
        "--backtest-boot", type=count(0), default=None, metavar="N", help="bootstrap refits per fold "
        "(default 50; 0: intervals from residual and seed noise only)"
    )  # fmt: skip
    bt.add_argument(
        "--backtest-level", type=fraction(), default=0.9, help="interval mass (default 0.9)"
    )
    bt.add_argument(
        "--backtest-folds", type=count(1), default=None, metavar="K",
        help="at most K rollout folds on long ladders (k spread evenly; default: every k)",
    )  # fmt: skip
    bs = p.add_argument_group("batch-size law (MiniCPM's iso-loss method; stored for the planner)")
    bs.add_argument(
        "--batch-curves",
        default=None,
        metavar="SOURCE",
        help="loss curves of a batch-size sweep: CSV/parquet (run_id, batch_tokens, tokens, loss"
        "[, N]) or an MLflow experiment whose runs log val_loss and tokens",
    )
    bs.add_argument(
        "--batch-levels",
        default=None,
        type=numbers(positive()),
        metavar="L1,L2,...",
        help="iso-loss levels (default: 6 levels between the curves' 30th and 5th percentiles)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--out", type=out_dir, default=None, help="write fit.json, points.csv and plots")
    p.add_argument(
        "--no-log-mlflow",
        action="store_true",
        help="with MLflow input and --out: do not record the fit and plots as an MLflow run",
    )
    return p


def _err(msg: str, command: str = "fit") -> int:
    say(f"windtunnel {command}: error: {msg}")
    return 2


def fit_combination(args: argparse.Namespace) -> str:
    """What is wrong with the combination of fit options ('' when nothing)."""
    if args.batch_levels is not None and not args.batch_curves:
        return "--batch-levels without --batch-curves: the levels cut the batch-size curves"
    if args.backtest_folds is not None and args.backtest != "rollout":
        return "--backtest-folds limits the folds of --backtest rollout; give that too"
    return ""


def fit_main(argv: list[str]) -> int:
    """Entry point of ``windtunnel fit``."""
    parser = _fit_parser()
    args = parser.parse_args(argv)
    problem = fit_combination(args)
    if problem:
        parser.error(problem)
    from windtunnel.scaling.analyze import analyze, json_summary, write_outputs
    from windtunnel.scaling.table import is_mlflow_source, load_table

    cols = {
        k: v
        for k, v in (
            ("N", args.n_col),
            ("D", args.d_col),
            ("C", args.c_col),
            (args.target, args.loss_col),
        )
        if v
    }
    budgets = tuple(args.budget or (1e21,))
    from_mlflow = is_mlflow_source(args.input)
    try:
        df = load_table(
            _mlflow_points(args.input, args.tracking_uri) if from_mlflow else args.input,
            columns=cols,
            flops_per_param_token=args.flops_per_param_token,
        )
        if args.stage is not None:
            if "stage" not in df.columns:
                raise ScalingError("--stage given but the table has no `stage` column")
            df = df[df["stage"] == args.stage]
        if args.query:
            try:
                df = df.query(args.query)
            except Exception as e:
                raise ScalingError(f"bad --query {args.query!r}: {e}") from None
        if args.drop_highest:
            if args.target not in df.columns:
                raise ScalingError(f"column {args.target!r} not in the table")
            df = df.sort_values(args.target).iloc[: -args.drop_highest]
        df = df.reset_index(drop=True)
        fit_file, fit, boot, extras = analyze(
            df,
            target=args.target,
            form=args.form,
            budgets=budgets,
            n_boot=args.bootstrap,
            seed=args.seed,
            level=args.level,
            delta=args.delta,
            reduction=args.reduction,
            source=str(args.input),
            backtest_mode=args.backtest or "largest",
            backtest_boot=args.backtest_boot,
            backtest_level=args.backtest_level,
            backtest_max_folds=args.backtest_folds,
            maxiter=args.maxiter,
        )
        bt_dict = fit_file["diagnostics"].get("backtest", {})
        if args.backtest and "skipped" in bt_dict:
            raise ScalingError(f"--backtest {args.backtest}: {bt_dict['skipped']}")
        bs_law = None
        if args.batch_curves:
            bs_law = _batch_law(args)
            fit_file["batch_size_law"] = bs_law.to_dict()
        paths: list[Path] = []
        summary = json_summary(fit_file)
        if args.backtest:
            summary["backtest"] = bt_dict
        if bs_law is not None:
            summary["batch_size_law"] = bs_law.to_dict()
        if args.out is not None:
            paths = write_outputs(fit_file, df, fit, boot, extras, args.out, target=args.target)
            if bs_law is not None:
                from windtunnel.scaling import plots

                paths.append(plots.batch_size_law(bs_law, args.out))
            if from_mlflow and not args.no_log_mlflow:
                summary["mlflow_run_id"] = _mlflow_log_fit(
                    args.input, paths, summary, args.tracking_uri
                )
    except ConvergenceError as e:
        return _err(
            f"{e}. With `windtunnel fit`: --maxiter N raises the cap (now {args.maxiter}); "
            "--drop-highest K or --query '...' drops outlying points; --delta sets the Huber "
            "threshold"
        )
    except ScalingError as e:
        return _err(str(e))
    except OSError as e:
        return _err(f"{e.__class__.__name__}: {e}")
    if args.out is not None:
        summary["out"] = str(args.out)
        summary["files"] = [str(p) for p in paths]
    if args.backtest:
        _print_backtest(bt_dict)
    if not args.json:
        _print_human(summary, budgets)
    else:
        print(json.dumps(summary))
    return 0


def _print_backtest(bt: Mapping[str, Any]) -> None:
    """The back-test's held-out points, one line each, then the summary by extrapolation."""
    level = bt["level"]
    inside = f"in {level:.0%}?"
    print(
        f"back-test ({bt['mode']}): {len(bt['points'])} held-out points, {level:.0%} prediction "
        f"intervals (bootstrap {bt['n_boot']} refits/fold + residual + seed noise)"
    )
    head = (
        f"{'k':>3} {'held-out N':>10} {'D':>9} {'observed':>9} {'predicted':>9} "
        f"{'interval':>19} {'rel.err':>8} {'extrap×':>8} {inside:>7}  flags"
    )
    print(head)
    for p in bt["points"]:
        iv = f"[{p['lo']:.4g}, {p['hi']:.4g}]"
        print(
            f"{p['k']:>3} {p['held_N']:>10.3g} {p['D']:>9.3g} {p['observed']:>9.4f} "
            f"{p['predicted']:>9.4f} {iv:>19} {100 * p['rel_error']:>+7.2f}% "
            f"{p['extrapolation']:>8.3g} {'yes' if p['inside'] else 'NO':>7}  {p.get('flags') or ''}"
        )
    s = bt["summary"]
    print(f"{'extrapolation':>14} {'points':>6} {'mean|err|':>9} {'max|err|':>9} {'coverage':>9}")
    rows = [(b["range"], b) for b in s["buckets"]]
    rows += [("≥2× (all)", s["at_least"]["2×"]), ("all", s["all"])]
    for name, b in rows:
        if not b.get("n"):
            continue
        print(
            f"{name:>14} {b['n']:>6} {100 * b['mean_abs_rel_error']:>8.2f}% "
            f"{100 * b['max_abs_rel_error']:>8.2f}% {100 * b['coverage']:>8.1f}%"
        )
    a = s["all"]
    print(
        f"  coverage {a['coverage']:.1%} of {a['n']} points inside their {level:.0%} interval "
        f"(nominal {level:.0%}); {s['n_folds']} fold(s)"
    )
    for w in s["flags"]:
        print(f"  flag: {w}")
    for w in s["skipped"]:
        print(f"  skipped fold: {w}")


# -- MLflow input: the one place scaling reaches into windtunnel.tracking (imported lazily) ------


def _mlflow_points(experiment: str, uri: str | None) -> pd.DataFrame:
    from windtunnel.tracking.runs import RunsError, runs_table

    try:
        return runs_table(experiment, uri=uri)
    except RunsError as e:
        raise InputError(str(e)) from None


def _mlflow_curves(experiment: str, uri: str | None) -> pd.DataFrame:
    from windtunnel.tracking.runs import RunsError, curves_table

    try:
        return curves_table(experiment, uri=uri)
    except RunsError as e:
        raise InputError(str(e)) from None


def _mlflow_log_fit(
    experiment: str, files: list[Path], summary: Mapping[str, Any], uri: str | None
) -> str:
    from windtunnel.tracking.runs import RunsError, log_fit

    try:
        return log_fit(experiment, files, summary, uri=uri)
    except RunsError as e:
        raise InputError(str(e)) from None


def _batch_law(args: argparse.Namespace) -> BatchSizeLaw:
    import numpy as np

    from windtunnel.scaling.batch_lr import batch_size_law_iso_loss
    from windtunnel.scaling.table import is_mlflow_source, load_curves

    if is_mlflow_source(args.batch_curves):
        curves = _mlflow_curves(args.batch_curves, args.tracking_uri)
    else:
        curves = load_curves(args.batch_curves)
    if curves.empty:
        raise ScalingError(f"no loss curves found in {args.batch_curves!r}")
    if args.batch_levels:
        levels = list(args.batch_levels)
    else:
        lo, hi = np.quantile(curves["loss"], [0.05, 0.3])
        levels = list(np.linspace(lo, hi, 6))
    group = "N" if "N" in curves.columns and curves["N"].notna().all() else None
    return batch_size_law_iso_loss(curves, levels, group_col=group)


def _fmt_iv(iv: Mapping[str, Any], k: str) -> str:
    if k in iv:
        return f"  [{iv[k][0]:.4g}, {iv[k][1]:.4g}]"
    return ""


def _print_human(s: Mapping[str, Any], budgets: Iterable[float]) -> None:
    iv = s.get("intervals", {})
    print(f"fitted {s['target']} = E + A/N^alpha + B/D^beta on {s['n_points']} points")
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        print(f"  {k:6s} {s[k]:.6g}{_fmt_iv(iv, k)}")
    print(
        f"  rms log residual {s['rms_log_residual']:.4f}; gradient {s['grad_norm']:.1e}; "
        f"{s['n_reached_best']}/{s['n_polished']} local searches reached the best"
    )
    for C in budgets:
        a = s["allocation"][f"{C:.3g}"]
        div = iv.get(f"C={C:.3g}", {})
        tpp = div.get("tokens_per_param")
        extra = f" [{tpp[0]:.3g}, {tpp[1]:.3g}]" if tpp else ""
        print(
            f"  C={C:.3g}: N_opt {a['N_opt']:.4g}, D_opt {a['D_opt']:.4g}, "
            f"D/N {a['tokens_per_param']:.4g}{extra}, loss {a['loss']:.4f}"
        )
    for w in s.get("warnings", []):
        print(f"  warning: {w}")
    bt = s.get("diagnostics", {}).get("backtest", {})
    if "coverage" in bt:
        print(
            f"  back-test ({bt['mode']}): max |error| {bt['max_abs_rel_error']:.2%}, "
            f"{bt['level']:.0%} coverage {bt['coverage']:.0%}"
        )
    if "out" in s:
        print(f"wrote {s['out']}/fit.json and plots")


def _plan_parser() -> Parser:
    from windtunnel.scaling.plan import GPU_PEAK_BF16

    p = Parser(
        prog="windtunnel plan",
        description=(
            "Plan the full run from a fit file: MiniCPM-shaped model for N_opt, tokens, batch "
            "size from the batch-size law, μP lr, WSD schedule, predicted loss with its "
            "interval and GPU-hours; writes a Hydra experiment config. Give the budget as "
            "--budget-flops, --params, --tokens, or --params with --tokens."
        ),
        epilog="example: windtunnel plan --fit runs/fit/fit.json --budget-flops 1e21 "
        "--gpu h100 --mfu 0.4 --out conf/experiment/full.yaml",
        formatter_class=WrappingHelpFormatter,
    )
    p.add_argument(
        "--fit",
        required=True,
        type=existing_path.hinted("write one with `windtunnel fit --out DIR`"),
        help="fit.json (or its folder) written by windtunnel fit --out",
    )
    p.add_argument("--budget-flops", type=BUDGET, help="compute budget C (FLOPs, C = 6ND)")
    p.add_argument(
        "--params", type=in_range(1, 1e15), help="model size N (non-embedding parameters)"
    )
    p.add_argument(
        "--tokens", type=in_range(1, 1e18), help="training tokens D (alone, or with --params)"
    )
    p.add_argument("--gpu", default="h100", choices=sorted(GPU_PEAK_BF16), help="GPU class")
    p.add_argument(
        "--mfu", type=fraction(closed_hi=True), default=0.4, help="model FLOPs utilization"
    )
    p.add_argument("--seq-len", type=count(1, 2**20), default=4096, help="training sequence length")
    p.add_argument(
        "--vocab-size", type=count(1, 2**24), default=122_753, help="vocabulary (MiniCPM-2.4B's)"
    )
    p.add_argument(
        "--lr",
        type=in_range(0, 1, open_lo=True),
        default=None,
        help="base lr (default: fit file, else 0.01)",
    )
    p.add_argument(
        "--batch-law",
        default=None,
        type=numbers([positive(), in_range()], names=("K", "GAMMA")),
        metavar="K,GAMMA",
        help="batch-size law bs = K / L^GAMMA in tokens (default: fit file, else MiniCPM's)",
    )
    p.add_argument(
        "--batch-tokens",
        type=in_range(0, 1e9, open_lo=True),
        default=None,
        metavar="TOKENS",
        help="batch size in tokens per step (instead of the batch-size law)",
    )
    p.add_argument("--name", default=None, help="model name in the config")
    p.add_argument("--out", type=out_file, default=None, help="write the experiment YAML here")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


PLAN_BUDGETS = "give --budget-flops, --params, --tokens, or --params with --tokens"


def plan_combination(args: argparse.Namespace) -> str:
    """What is wrong with the combination of plan options ('' when nothing): the one place
    where options that depend on each other are checked."""
    given = [o for o in ("budget_flops", "params", "tokens") if getattr(args, o) is not None]
    flags = " with ".join("--" + o.replace("_", "-") for o in given)
    if not given:
        return f"no budget: {PLAN_BUDGETS}"
    if "budget_flops" in given and len(given) > 1:
        return f"{flags}: --budget-flops sets N and D itself; {PLAN_BUDGETS}"
    if args.batch_tokens is not None and args.batch_law is not None:
        return "--batch-tokens with --batch-law: give one (a batch, or the law that picks it)"
    return ""


def plan_main(argv: list[str]) -> int:
    """Entry point of ``windtunnel plan``."""
    parser = _plan_parser()
    args = parser.parse_args(argv)
    problem = plan_combination(args)
    if problem:
        parser.error(problem)
    from windtunnel.scaling.plan import load_fit_file, make_plan

    try:
        bl = None
        if args.batch_law:
            k, g = args.batch_law
            bl = {"k": k, "gamma": g}
        plan = make_plan(
            load_fit_file(args.fit),
            budget_flops=args.budget_flops,
            params=args.params,
            tokens=args.tokens,
            gpu=args.gpu,
            mfu=args.mfu,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            lr=args.lr,
            batch_law=bl,
            batch_tokens=args.batch_tokens,
            name=args.name,
        )
        text = plan.to_yaml()
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            args.out.with_suffix(".plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
    except ScalingError as e:
        return _err(str(e), "plan")
    except OSError as e:
        return _err(f"{e.__class__.__name__}: {e}", "plan")
    for w in plan.warnings:  # one line each, on stderr: seen next to the YAML or the JSON
        print(f"WARNING: {w.line()}", file=sys.stderr)
    if args.json:
        d = plan.to_dict()
        if args.out is not None:
            d["out"] = str(args.out)
        print(json.dumps(d))
    else:
        print(text if args.out is None else f"{text}\nwrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    cmd, *rest = sys.argv[1:] or ["fit"]
    sys.exit(fit_main(rest) if cmd == "fit" else plan_main(rest))
