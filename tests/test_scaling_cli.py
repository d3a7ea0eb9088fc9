"""`windtunnel fit` / `windtunnel plan` entry points (called in-process)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from windtunnel.cli.fit import fit_main, plan_main
from windtunnel.config import to_run_config
from windtunnel.scaling import DataModelLaw

TRUTH = DataModelLaw(E=1.6, A=350.0, B=900.0, alpha=0.32, beta=0.3)


@pytest.fixture
def csv(tmp_path):
    rng = np.random.default_rng(0)
    N = np.repeat(np.geomspace(1e7, 2e9, 5), 4)
    D = N * np.tile([10, 20, 40, 80], 5)
    L = TRUTH.predict(N, D) * np.exp(0.003 * rng.standard_normal(len(N)))
    p = tmp_path / "points.csv"
    pd.DataFrame({"params": N, "tokens": D, "val": L}).to_csv(p, index=False)
    return p


def test_fit_json_and_plan_from_csv(csv, tmp_path, capsys):
    out = tmp_path / "fit"
    argv = ["--input", str(csv), "--n-col", "params", "--d-col", "tokens", "--loss-col", "val"]
    rc = fit_main([*argv, "--bootstrap", "20", "--seed", "3", "--json", "--out", str(out)])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    s = json.loads(last)
    for k in ("E", "A", "B", "alpha", "beta", "a", "b", "intervals", "n_points", "grad_norm"):
        assert k in s
    assert s["n_points"] == 20 and s["bootstrap"]["seed"] == 3
    assert s["alpha"] == pytest.approx(0.32, abs=0.05)
    assert len(s["intervals"]["alpha"]) == 2
    assert (out / "fit.json").exists() and (out / "fitted_vs_observed.png").exists()
    assert (out / "bootstrap.png").exists()

    yml = tmp_path / "conf" / "experiment" / "full.yaml"
    rc = plan_main(["--fit", str(out / "fit.json"), "--budget-flops", "1e21", "--gpu", "a100",
                    "--mfu", "0.5", "--out", str(yml), "--json"])  # fmt: skip
    assert rc == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = to_run_config(yaml.safe_load(yml.read_text()))
    assert cfg.model.d_model == plan["shape"]["d_model"] and plan["gpu"] == "a100"


def test_user_errors_are_one_line_without_traceback(csv, tmp_path, capsys):
    assert fit_main(["--input", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
    assert fit_main(["--input", str(csv), "--n-col", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    one = tmp_path / "one.csv"
    pd.DataFrame({"N": [1e8] * 8, "D": np.geomspace(1e9, 1e11, 8), "loss": 3.0}).to_csv(one)
    assert fit_main(["--input", str(one), "--bootstrap", "0"]) == 2
    assert "α is not identifiable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # refused by the option's check, before any work
        plan_main(["--fit", str(tmp_path / "nofit.json"), "--params", "1e9"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--fit" in err and "does not exist" in err and "windtunnel fit --out" in err
    assert len(err.splitlines()) == 1


def test_help_mentions_the_options(capsys):
    with pytest.raises(SystemExit):
        fit_main(["--help"])
    h = capsys.readouterr().out
    for opt in ("--input", "--form", "--target", "--json", "--out", "--tracking-uri", "--n-col"):
        assert opt in h
    with pytest.raises(SystemExit):
        plan_main(["--help"])
    h = capsys.readouterr().out
    for opt in ("--fit", "--budget-flops", "--params", "--tokens", "--gpu", "--mfu", "--out"):
        assert opt in h


def _bs_curves(k=1.21e9, gamma=6.24, c=0.15):
    rows = []
    levels = np.linspace(2.4, 3.8, 200)
    for i, b in enumerate(np.geomspace(2**16, 2**24, 9)):
        T = 1e8 * (levels - 2.0) ** -8.0 * np.exp(c * (np.log(b) - np.log(k / levels**gamma)) ** 2)
        rows += [
            {"run_id": f"r{i}", "batch_tokens": b, "tokens": t, "loss": v}
            for t, v in zip(T, levels)
        ]
    return pd.DataFrame(rows)


def test_batch_size_law_goes_into_the_fit_file_and_the_plan(csv, tmp_path, capsys):
    curves = tmp_path / "curves.csv"
    _bs_curves().to_csv(curves, index=False)
    out = tmp_path / "fit"
    argv = ["--input", str(csv), "--n-col", "params", "--d-col", "tokens", "--loss-col", "val",
            "--bootstrap", "0", "--batch-curves", str(curves), "--batch-levels", "2.6,2.8,3.0,3.3",
            "--json", "--out", str(out)]  # fmt: skip
    assert fit_main(argv) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["batch_size_law"]["gamma"] == pytest.approx(6.24, rel=0.02)
    assert (out / "batch_size_law.png").exists()
    assert plan_main(["--fit", str(out), "--params", "1e9", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    law = s["batch_size_law"]
    assert plan["batch_tokens"] == pytest.approx(law["k"] / plan["loss"] ** law["gamma"])
    assert not any("MiniCPM's law" in n for n in plan["notes"])


def _micro_fit_file(tmp_path):
    """A fit file whose points are a CPU micro ladder (what the demo's plan extrapolates from)."""
    law = DataModelLaw.from_minicpm(C_N=7.15e-2, C_D=3.00e-1, alpha=0.29, beta=0.23, L0=0.31)
    span = {"N": [6e3, 1.9e5], "D": [6e4, 7.6e6], "C": [2.2e9, 8.6e12],
            "tokens_per_param": [10.0, 40.0]}  # fmt: skip
    f = {"kind": "windtunnel.scaling.fit", "version": 2, "fit": {**law.to_dict(), "target": "loss"},
         "data_range": span, "bootstrap": None,
         "batch_size_law": {"k": 1e5, "gamma": 8.0, "loss_range": [2.1, 2.9]}}  # fmt: skip
    p = tmp_path / "fit.json"
    p.write_text(json.dumps(f))
    return p


def test_plan_prints_each_warning_as_one_line_on_stderr(tmp_path, capsys):
    from windtunnel.cli import main

    fit = _micro_fit_file(tmp_path)
    assert main(["plan", "--fit", str(fit), "--budget-flops", "1e21", "--json"]) == 0
    cap = capsys.readouterr()
    plan = json.loads(cap.out.strip().splitlines()[-1])
    lines = cap.err.strip().splitlines()
    assert [w["code"] for w in plan["warnings"]] == [
        "no_interval", "extrapolation", "tokens_per_param", "batch_law_range"
    ]  # fmt: skip
    assert lines == [f"WARNING: {w['message']}; {w['todo']}" for w in plan["warnings"]]
    assert any("1.2e+08x the largest fitted" in x for x in lines)
    # the YAML (no --json) carries the same warnings in its header
    assert main(["plan", "--fit", str(fit), "--budget-flops", "1e21"]) == 0
    cap = capsys.readouterr()
    assert "# WARNING (extrapolation): compute 6ND" in cap.out
    assert cap.err.count("WARNING: ") == 4


def test_plan_with_too_few_steps_is_refused(tmp_path, capsys):
    from windtunnel.cli import main

    fit, out = _micro_fit_file(tmp_path), tmp_path / "full.yaml"
    argv = ["plan", "--fit", str(fit), "--params", "1e8", "--tokens", "1e9"]
    assert main([*argv, "--batch-tokens", "2e7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("windtunnel plan: error: the plan has 49 optimizer steps")
    assert "lower the batch (--batch-tokens" in err and not out.exists()
    assert main([*argv, "--batch-tokens", "1e6", "--out", str(out)]) == 0  # what it says works
    assert out.exists()


def test_fit_errors_name_only_options_the_cli_has(csv, capsys):
    """A fit that stops at its iteration cap says which `windtunnel fit` options help."""
    import re

    argv = ["--input", str(csv), "--n-col", "params", "--d-col", "tokens", "--loss-col", "val"]
    assert fit_main([*argv, "--bootstrap", "0", "--maxiter", "1"]) == 2
    err = capsys.readouterr().err
    assert "did not converge" in err and "--maxiter N raises the cap (now 1)" in err
    assert "fix a parameter" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        fit_main(["--help"])
    help_text = capsys.readouterr().out
    named = set(re.findall(r"--[a-z][a-z-]*", err))
    assert named and all(opt in help_text for opt in named), named
    assert fit_main([*argv, "--bootstrap", "0", "--maxiter", "4000", "--json"]) == 0
