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
    assert plan_main(["--fit", str(tmp_path / "nofit.json"), "--params", "1e9"]) == 2
    assert "no fit file" in capsys.readouterr().err


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
