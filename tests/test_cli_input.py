"""Every command answers bad input with one clear line: exit 2, one stderr line naming the option
and what it allows, never a traceback; a result that exits 0 is meaningful; pipes and signals end
a command cleanly.

The ranges below are written here independently of windtunnel/cli/checks.py, so that a check
that drifts from what the option should take fails a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from windtunnel.cli import build_parser, main
from windtunnel.cli.checks import Check
from windtunnel.cli.fit import _fit_parser, _plan_parser
from windtunnel.scaling import DataModelLaw

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- fixtures: a ladder table and its fit file (made once) -------------------------------------


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    truth = DataModelLaw(E=1.6, A=350.0, B=900.0, alpha=0.32, beta=0.3)
    rng = np.random.default_rng(0)
    N = np.repeat(np.geomspace(1e7, 2e9, 5), 4)
    D = N * np.tile([10, 20, 40, 80], 5)
    L = truth.predict(N, D) * np.exp(0.003 * rng.standard_normal(len(N)))
    path = tmp_path_factory.mktemp("ladder") / "points.csv"
    pd.DataFrame({"N": N, "D": D, "loss": L}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def fit_dir(ladder: Path) -> Path:
    out = ladder.parent / "fit"
    assert main(["fit", "--input", str(ladder), "--bootstrap", "20", "--out", str(out)]) == 0
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_refusal(rc: int, out: str, err: str, *names: str) -> None:
    """Exit 2, exactly one stderr line that names ``names``, nothing on stdout, no traceback."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)
    assert out == "", out


# -- the values a user might type ---------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**6), max_value=10**40).map(str),
    st.floats(min_value=-1e3, max_value=1e3).map(lambda x: f"{x:.3g}"),
    st.sampled_from(["0", "-0", "1", "-1", "0.5", "1e-300", "1e308", "nan", "-inf", "Infinity",
                     "1.5", "2e3", "", " ", "abc", "1,2", "0x10", "1_000"]),
)  # fmt: skip


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _whole(text: str) -> int | None:
    value = _number(text)
    return int(value) if value is not None and value.is_integer() else None


def between(lo: float, hi: float = math.inf, *, open_lo: bool = False, open_hi: bool = False):
    def ok(text: str) -> bool:
        x = _number(text)
        if x is None:
            return False
        return (x > lo if open_lo else x >= lo) and (x < hi if open_hi else x <= hi)

    return ok


def whole(lo: int, hi: float = math.inf):
    def ok(text: str) -> bool:
        x = _whole(text)
        return x is not None and lo <= x <= hi

    return ok


FIT_OPTIONS: dict[str, Callable[[str], bool]] = {
    "--flops-per-param-token": between(0, open_lo=True),
    "--drop-highest": whole(0),
    "--delta": between(0, open_lo=True),
    "--maxiter": whole(1),
    "--bootstrap": whole(0),
    "--seed": whole(0),
    "--level": between(0, 1, open_lo=True, open_hi=True),
    "--budget": between(0, 1e30, open_lo=True),
    "--backtest-boot": whole(0),
    "--backtest-level": between(0, 1, open_lo=True, open_hi=True),
    "--backtest-folds": whole(1),
}

PLAN_OPTIONS: dict[str, Callable[[str], bool]] = {
    "--budget-flops": between(0, 1e30, open_lo=True),
    "--params": between(1, 1e15),
    "--tokens": between(1, 1e18),
    "--mfu": between(0, 1, open_lo=True),
    "--seq-len": whole(1, 2**20),
    "--vocab-size": whole(1, 2**24),
    "--lr": between(0, 1, open_lo=True),
    "--batch-tokens": between(0, 1e9, open_lo=True),
}


def _fit_argv(ladder: Path, option: str, value: str) -> list[str]:
    extra = ["--backtest", "rollout"] if option == "--backtest-folds" else []
    return ["--input", str(ladder), "--bootstrap", "0", *extra, f"{option}={value}"]


def _plan_argv(fit_dir: Path, option: str, value: str) -> list[str]:
    budget = [] if option in ("--budget-flops", "--params", "--tokens") else ["--budget-flops=1e21"]
    return ["--fit", str(fit_dir), *budget, f"{option}={value}", "--json"]


# -- property-based: the numeric options of fit and plan -----------------------------------------


@PROPERTY
@given(option=st.sampled_from(sorted(FIT_OPTIONS)), value=NUMBERS)
def test_fit_numeric_options_refuse_out_of_range_in_one_line(
    capsys: pytest.CaptureFixture[str], ladder: Path, option: str, value: str
) -> None:
    argv = _fit_argv(ladder, option, value)
    if FIT_OPTIONS[option](value):  # allowed: the parser takes it (the fit itself is slow)
        _fit_parser().parse_args(argv)
        return
    _one_line_refusal(*_run(capsys, "fit", *argv), option, "windtunnel fit --help")


@PROPERTY
@given(option=st.sampled_from(sorted(PLAN_OPTIONS)), value=NUMBERS)
def test_plan_numeric_options_refuse_in_one_line_or_give_a_meaningful_plan(
    capsys: pytest.CaptureFixture[str], fit_dir: Path, option: str, value: str
) -> None:
    rc, out, err = _run(capsys, "plan", *_plan_argv(fit_dir, option, value))
    assert "Traceback" not in err
    if not PLAN_OPTIONS[option](value):
        _one_line_refusal(rc, out, err, option, "windtunnel plan --help")
        return
    assert rc in (0, 2), err  # allowed: a plan, or a refusal that says why in one line
    if rc == 2:
        _one_line_refusal(rc, out, err)
        return
    _assert_meaningful(json.loads(out.strip().splitlines()[-1]))


def _assert_meaningful(plan: dict[str, Any]) -> None:
    """A plan that exits 0: finite numbers, tokens, steps, a real model."""
    for key in ("loss", "C_6ND", "C_exact", "gpu_hours", "batch_tokens", "lr", "tokens_per_param"):
        assert math.isfinite(plan[key]) and plan[key] > 0, (key, plan[key])
    assert plan["D"] >= 1 and plan["N"] >= 1 and plan["batch_size"] >= 1
    assert plan["steps"] >= 200  # plancheck.MIN_STEPS
    assert 1 <= plan["shape"]["n_layers"] <= 4 * 400 and plan["shape"]["d_model"] <= 32768


@PROPERTY
@given(
    budget=st.floats(min_value=1e12, max_value=1e30),
    mfu=st.floats(min_value=1e-3, max_value=1.0),
    seq_len=st.sampled_from([1, 64, 2048, 4096, 2**20]),
)
def test_any_allowed_budget_gives_a_meaningful_plan_or_one_line(
    capsys: pytest.CaptureFixture[str], fit_dir: Path, budget: float, mfu: float, seq_len: int
) -> None:
    argv = ["--fit", str(fit_dir), f"--budget-flops={budget!r}", f"--mfu={mfu!r}",
            f"--seq-len={seq_len}", "--json"]  # fmt: skip
    rc, out, err = _run(capsys, "plan", *argv)
    if rc == 2:
        _one_line_refusal(rc, out, err)
    else:
        assert rc == 0 and "Traceback" not in err
        _assert_meaningful(json.loads(out.strip().splitlines()[-1]))


# -- named cases: the mistakes people make -------------------------------------------------------

CASES: dict[str, tuple[list[str], list[str]]] = {
    # fit
    "fit zero budget": (["fit", "--budget", "0"], ["--budget", "(0, 1e+30]"]),
    "fit negative budget": (["fit", "--budget", "-1e21"], ["--budget", "-1e21"]),
    "fit infinite budget": (["fit", "--budget", "inf"], ["--budget", "finite"]),
    "fit nan level": (["fit", "--level", "nan"], ["--level", "(0, 1)"]),
    "fit level of 95": (["fit", "--level", "95"], ["--level", "(0, 1)"]),
    "fit negative bootstrap": (["fit", "--bootstrap", "-1"], ["--bootstrap", "≥ 0"]),
    "fit fractional bootstrap": (["fit", "--bootstrap", "1.5"], ["--bootstrap", "whole"]),
    "fit zero maxiter": (["fit", "--maxiter", "0"], ["--maxiter", "≥ 1"]),
    "fit levels without curves": (["fit", "--batch-levels", "2,3"], ["--batch-curves"]),
    "fit bad levels": (["fit", "--batch-curves", "x.csv", "--batch-levels", "2,-3"], ["-3"]),
    "fit folds without rollout": (["fit", "--backtest-folds", "3"], ["rollout"]),
    "fit unknown option": (["fit", "--bootstraps", "3"], ["--bootstraps"]),
    # plan
    "plan zero budget": (["plan", "--budget-flops", "0"], ["--budget-flops", "(0, 1e+30]"]),
    "plan negative budget": (["plan", "--budget-flops", "-1e21"], ["--budget-flops"]),
    "plan nan budget": (["plan", "--budget-flops", "nan"], ["--budget-flops", "finite"]),
    "plan zero params": (["plan", "--params", "0"], ["--params", "[1, 1e+15]"]),
    "plan negative tokens": (["plan", "--tokens", "-1"], ["--tokens"]),
    "plan budget with tokens": (
        ["plan", "--budget-flops", "1e21", "--tokens", "1e9"],
        ["--budget-flops with --tokens"],
    ),
    "plan no budget": (["plan"], ["--budget-flops", "--params", "--tokens"]),
    "plan mfu as percent": (["plan", "--params", "1e9", "--mfu", "40"], ["--mfu", "(0, 1]"]),
    "plan zero seq len": (["plan", "--params", "1e9", "--seq-len", "0"], ["--seq-len"]),
    "plan batch law of three": (
        ["plan", "--params", "1e9", "--batch-law", "1,2,3"],
        ["--batch-law", "K,GAMMA"],
    ),
    "plan batch law zero k": (["plan", "--params", "1e9", "--batch-law", "0,6"], ["K = 0"]),
    "plan batch tokens and law": (
        ["plan", "--params", "1e9", "--batch-tokens", "4e6", "--batch-law", "1e9,6"],
        ["--batch-tokens with --batch-law"],
    ),
    "plan fit missing": (
        ["plan", "--fit", "/nonexistent/fit.json", "--params", "1e9"],
        ["--fit", "does not exist", "windtunnel fit --out"],
    ),
    "plan no tokens": (["plan", "--budget-flops", "1e-5"], ["no MiniCPM-shaped model"]),
    "plan impossible model": (["plan", "--params", "1e15"], ["layers"]),
    "plan too few steps": (["plan", "--params", "1e9", "--tokens", "1e5"], ["optimizer steps"]),
    # train (options and Hydra overrides)
    "train zero world size": (["train", "--dry-run", "--world-size", "0"], ["--world-size"]),
    "train nan mfu": (["train", "--dry-run", "--mfu", "nan"], ["--mfu"]),
    "train negative width": (["train", "--dry-run", "model.d_model=-1"], ["model.d_model"]),
    "train unknown key": (["train", "--dry-run", "model.width=256"], ["model.width", "d_model"]),
    "train tokens not a number": (
        ["train", "--dry-run", "train.tokens=abc"],
        ["train.tokens", "Integer"],
    ),
    "train nan lr": (["train", "--dry-run", "optim.lr=nan"], ["optim.lr", "finite"]),
    "train dashed override": (["train", "--model.d_model=64"], ["no dashes", "model.d_model=64"]),
    "train unknown model": (["train", "--dry-run", "model=nope"], ["model/nope", "micro_s"]),
    # the other commands' most likely mistakes
    "params unknown model": (["params", "model=micro_zz"], ["micro_zz"]),
    "prepare bad override": (["prepare", "data.seq_len=long"], ["data.seq_len"]),
    "coordcheck two widths": (["coordcheck", "--widths", "64", "128"], ["at least 3 widths"]),
    "coordcheck zero steps": (["coordcheck", "--steps", "0"], ["--steps", "≥ 1"]),
    "coordcheck zero width": (["coordcheck", "--widths", "0", "64", "128"], ["--widths"]),
    "bench unknown model": (["bench", "--models", "micro_zz"], ["--models", "micro_zz"]),
    "bench zero steps": (["bench", "--steps", "0"], ["--steps"]),
    "sweep missing spec": (["sweep", "sweeps/nope.yaml"], ["no spec", "smoke"]),
    "sweep bad override": (["sweep", "smoke", "sweep.n_trials=many"], ["sweep.n_trials"]),
    "replay missing journal": (["replay", "--path", "/nonexistent/runs"], ["--path"]),
    "replay bad uri": (["replay", "--tracking-uri", "localhost:5000"], ["--tracking-uri"]),
    "server bad action": (["server", "restart"], ["restart", "start"]),
    "tunnel unknown stage": (["tunnel", "demo", "--stage", "fitt"], ["fitt", "fit"]),
    "tunnel unknown setting": (
        ["tunnel", "demo", "tunnel.nope=1", "--dry-run"],
        ["tunnel.nope", "ladder"],
    ),
    "sweep no trials": (["sweep", "smoke", "sweep.n_trials=0"], ["sweep.n_trials", "≥ 1"]),
    "tunnel as experiment": (["tunnel", "experiment=demo"], ["by position"]),
    "status unknown tunnel": (["status", "nope"], ["no spec", "demo"]),
    "export missing run": (["export", "/nonexistent/run", "out"], ["RUN_DIR", "does not exist"]),
    "export zero point": (["export", ".", "out", "--point", "0"], ["--point", "≥ 1"]),
    "export out is a file": (["export", ".", "pyproject.toml"], ["OUT", "is a file"]),
    # the command line itself
    "no command": ([], ["COMMAND"]),
    "unknown command": (["trian"], ["trian", "train"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_named_mistakes_are_one_line(
    name: str, capsys: pytest.CaptureFixture[str], ladder: Path, fit_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(REPO)
    argv, words = CASES[name]
    if argv[:1] == ["fit"]:
        argv = ["fit", "--input", str(ladder), "--bootstrap", "0", *argv[1:]]
    if argv[:1] == ["plan"] and "--fit" not in argv:
        argv = ["plan", "--fit", str(fit_dir), *argv[1:]]
    _one_line_refusal(*_run(capsys, *argv), *words)


def _edit_fit(fit_dir: Path, tmp: Path, **law: float) -> Path:
    data = json.loads((fit_dir / "fit.json").read_text())
    data["fit"].update(law)
    (tmp / "fit.json").write_text(json.dumps(data))
    return tmp / "fit.json"


def test_plan_whose_predicted_loss_is_infinite_is_refused(
    capsys: pytest.CaptureFixture[str], fit_dir: Path, tmp_path: Path
) -> None:
    bad = _edit_fit(fit_dir, tmp_path, E=1.7e308, A=1.7e308, alpha=1e-6)  # E + A/N^α overflows
    argv = ["--fit", str(bad), "--params", "1e9", "--tokens", "1e11", "--json"]
    rc, out, err = _run(capsys, "plan", *argv)
    _one_line_refusal(rc, out, err)
    assert "inf" in err or "finite" in err or "usable" in err


def test_isoflop_profiles_are_omitted_on_a_table_that_is_not_an_isoflop_design(
    capsys: pytest.CaptureFixture[str], ladder: Path, fit_dir: Path
) -> None:
    """A tokens-per-parameter ladder has no budgets with ≥3 sizes: no parabolas, a note."""
    iso = json.loads((fit_dir / "fit.json").read_text())["diagnostics"]["isoflop"]
    assert set(iso) == {"skipped"} and "IsoFLOP" in iso["skipped"]


def test_isoflop_needs_centred_minima(tmp_path: Path) -> None:
    """Budgets whose parabola has its minimum outside the sampled sizes are no isoFLOP finding."""
    from windtunnel.scaling.analyze import analyze

    truth = DataModelLaw(E=1.6, A=350.0, B=900.0, alpha=0.32, beta=0.3)
    rows = []
    for C in (1e17, 1e18, 1e19):  # three sizes per budget, all far below the optimum
        for N in np.geomspace(1e5, 4e5, 3):
            rows.append({"N": N, "D": C / (6 * N), "C": C})
    df = pd.DataFrame(rows)
    df["loss"] = truth.predict(df["N"].to_numpy(), df["D"].to_numpy())
    fit_file, *_ = analyze(df, n_boot=0, backtest_boot=0)
    assert "skipped" in fit_file["diagnostics"]["isoflop"], fit_file["diagnostics"]["isoflop"]
    assert "centred" in fit_file["diagnostics"]["isoflop"]["skipped"]


# -- --help shows every range ----------------------------------------------------------------------


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    found: dict[str, argparse.ArgumentParser] = {"windtunnel": top}
    found.update({f"windtunnel {k}": v for k, v in top.commands.items()})  # type: ignore[attr-defined]
    found["windtunnel fit"], found["windtunnel plan"] = _fit_parser(), _plan_parser()
    return found


def test_help_shows_the_allowed_range_of_every_checked_option() -> None:
    checked = 0
    for prog, parser in _parsers().items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action.type, Check):
                checked += 1
                assert f"[{' '.join(action.type.allowed.split())}]" in text, (prog, action.dest)
    assert checked >= 30


NUMERIC_OPTIONS = {
    "windtunnel train": {"--world-size", "--mfu"},
    "windtunnel coordcheck": {"--widths", "--steps", "--seeds", "--out"},
    "windtunnel bench": {"--steps"},
    "windtunnel replay": {"--path", "--tracking-uri"},
    "windtunnel export": {"--point", "--checkpoint", "--tokenizer"},
    "windtunnel fit": {f for f in FIT_OPTIONS} | {"--out", "--batch-levels", "--tracking-uri"},
    "windtunnel plan": {f for f in PLAN_OPTIONS} | {"--fit", "--out", "--batch-law"},
}


def test_every_numeric_and_path_option_is_checked_where_it_enters() -> None:
    parsers = _parsers()
    for prog, options in NUMERIC_OPTIONS.items():
        have = {
            opt
            for a in parsers[prog]._actions
            if isinstance(a.type, Check)
            for opt in a.option_strings
        }
        assert options <= have, (prog, options - have)


# -- pipes and signals -----------------------------------------------------------------------------


class _ClosedPipe:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_ends_quietly_in_process(
    capsys: pytest.CaptureFixture[str], fit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    rc = main(["plan", "--fit", str(fit_dir), "--budget-flops", "1e21"])
    monkeypatch.undo()
    assert rc == 141 and capsys.readouterr().err.count("Traceback") == 0


def test_output_piped_into_head_exits_cleanly(fit_dir: Path) -> None:
    """The reader is gone before the first write (as with `| head -1` on a long output)."""
    read, write = os.pipe()
    os.close(read)
    cmd = [sys.executable, "-m", "windtunnel", "plan", "--fit", str(fit_dir), "--budget-flops", "1e21"]  # fmt: skip
    proc = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert "Exception ignored" not in proc.stderr


def test_ctrl_c_is_one_line_and_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("windtunnel.cli.fit.fit_main", interrupted)
    rc, _, err = _run(capsys, "fit", "--input", "x.csv")
    assert rc == 130 and err.strip() == "windtunnel fit: interrupted"


def test_ctrl_c_during_a_real_fit(ladder: Path) -> None:
    cmd = [sys.executable, "-m", "windtunnel", "fit", "--input", str(ladder), "--bootstrap", "100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # imported, fitting or bootstrapping
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "windtunnel fit: interrupted"


def test_sigterm_unwinds_a_sweep_driver_and_keeps_its_state(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the driver runs its cleanup (launchers closed, state saved), then 75."""
    import windtunnel.sweep

    cleaned: list[str] = []

    def run_sweep(spec: Any, view: Any = None) -> Any:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler interrupts this
        finally:
            cleaned.append("closed")
        raise AssertionError("SIGTERM did not stop the driver")

    monkeypatch.setattr(windtunnel.sweep, "run_sweep", run_sweep)
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    rc, _, err = _run(capsys, "sweep", str(REPO / "sweeps/smoke.yaml"))
    assert time.monotonic() - t0 < 20
    assert rc == 75 and cleaned == ["closed"]
    assert len(err.splitlines()) == 1 and "SIGTERM" in err and "resume" in err
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_to_a_real_sweep_keeps_the_study(tmp_path: Path) -> None:
    from helpers import local_sweep

    args, cmd, env = local_sweep(tmp_path, "train.tokens=200000")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "sweeps/smoke/optuna.journal"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.stat().st_size > 0:
            break  # the study is open, its first trials asked for
        time.sleep(0.1)
    time.sleep(2)  # trials running
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("windtunnel sweep: stopped by SIGTERM")
    import optuna

    from windtunnel.sweep import load_sweep
    from windtunnel.sweep.driver import storage_url
    from windtunnel.sweep.trial import open_storage

    spec = load_sweep(REPO / "sweeps/smoke.yaml", args)
    study = optuna.load_study(study_name="smoke", storage=open_storage(storage_url(spec)))
    trials = study.get_trials()
    assert trials and not any(t.state.name == "COMPLETE" for t in trials)  # stopped mid-trial
    assert all(t.state.name in ("RUNNING", "FAIL", "PRUNED") for t in trials)
