"""The planner's sanity checks (pure functions) and what make_plan does with them: warn, clamp,
refuse; the fit file's ranges (version 2) and the upgrade of version-1 files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling import DataModelLaw
from windtunnel.scaling.analyze import FIT_FILE_VERSION, analyze
from windtunnel.scaling.errors import InputError, PlanRefusedError
from windtunnel.scaling.plan import load_fit_file, make_plan
from windtunnel.scaling.plancheck import (
    MIN_STEPS,
    PlanWarning,
    check_batch_clamp,
    check_batch_law,
    check_extrapolation,
    check_fit_file,
    check_intervals,
    check_steps,
    check_tokens_per_param,
)

MINICPM = DataModelLaw.from_minicpm(C_N=7.15e-2, C_D=3.00e-1, alpha=0.29, beta=0.23, L0=0.31)
MICRO = {  # the span of a CPU micro ladder (N 6k-190k, 10-40 tokens per parameter)
    "N": [6e3, 1.9e5],
    "D": [6e4, 7.6e6],
    "C": [2.2e9, 8.6e12],
    "tokens_per_param": [10.0, 40.0],
    "loss": [2.0, 3.4],
}


def _fit(data_range=None, boot=True, **extra):
    f = {
        "kind": "windtunnel.scaling.fit",
        "version": FIT_FILE_VERSION,
        "fit": {**MINICPM.to_dict(), "target": "loss"},
        "data_range": data_range,
        "batch_size_law": {"k": 2.7e4, "gamma": 6.24, "loss_range": [0.4, 0.5]},
        **extra,
    }
    if boot:
        rng = np.random.default_rng(0)
        p = np.array([MINICPM.E, MINICPM.A, MINICPM.B, MINICPM.alpha, MINICPM.beta])
        s = p * (1 + 0.01 * rng.standard_normal((50, 5)))
        f["bootstrap"] = {"samples": s.tolist(), "seed": 0, "n_boot": 50, "n_failed": 0,
                          "level": 0.95}  # fmt: skip
    return f


def _codes(ws: list[PlanWarning]) -> list[str]:
    return [w.code for w in ws]


# -- each check, pure ---------------------------------------------------------------------------


def test_too_few_steps_is_refused_with_what_to_change():
    assert check_steps(MIN_STEPS * 4096 * 8, 8, 4096) == []
    (w,) = check_steps(37 * 4096 * 8, 8, 4096)
    assert w.action == "refuse" and w.code == "steps"
    assert "37 optimizer steps" in w.message and "--batch-tokens" in w.todo
    assert "--budget-flops" in w.todo and "\n" not in w.line()


def test_batch_below_one_sequence_is_clamped():
    assert check_batch_clamp(4096.0, 4096) == []
    (w,) = check_batch_clamp(100.0, 4096)
    assert w.action == "clamp" and "clamped to 1 sequence" in w.message


def test_compute_far_beyond_the_fit_warns_with_the_factor():
    assert check_extrapolation(1e5, 2e6, MICRO) == []  # inside the fitted range
    assert check_extrapolation(2.4e6, 6.8e13, None) == []  # nothing to compare with
    (w,) = check_extrapolation(2.4e6, 6.8e13, MICRO)
    assert w.action == "warn" and w.code == "extrapolation"
    assert "1.1e+08x the largest fitted" in w.message and "not a finding" in w.message
    assert "D = 6.8e+13 is 8.9e+06x" in w.message  # N (13x) is within the limit: not listed
    assert "N = " not in w.message


def test_tokens_per_param_outside_the_ladder_warns():
    assert check_tokens_per_param(1e5, 6e6, MICRO) == []  # 60: within 2x of 40
    (w,) = check_tokens_per_param(2.4e6, 6.8e13, MICRO)
    assert "2.83e+07 tokens per parameter" in w.message and "10-40" in w.message
    (w,) = check_tokens_per_param(1e6, 2e6, MICRO)  # 2 tokens/param, below the ladder
    assert "5x beyond" in w.message
    assert check_tokens_per_param(1e6, 2e6, {"N": [1, 2]}) == []  # older range: no ratio


def test_batch_law_outside_its_losses_warns():
    law = {"k": 8.4e8, "gamma": 14.5, "loss_range": [2.1, 2.9]}
    assert check_batch_law(2.5, law) == []
    assert check_batch_law(2.0, law) == []  # within 5%
    (w,) = check_batch_law(0.87, law)
    assert "fitted at losses 2.1-2.9" in w.message and "predicted 0.87" in w.message
    assert "3.5e+05x the one at the nearest fitted loss" in w.message
    assert check_batch_law(0.87, {"k": 1.21e9, "gamma": 6.24}) == []  # no range recorded


def test_wide_intervals_warn():
    (w,) = check_intervals(1.0, None, (0.0017, 6.0e9))
    assert w.code == "tokens_per_param_interval" and "12.5 decades" in w.message
    (w,) = check_intervals(1.0, None, (0.0, 40.0))
    assert "unbounded" in w.message
    assert check_intervals(1.0, (0.98, 1.02), (20.0, 200.0)) == []
    (w,) = check_intervals(0.866, (0.246, 1.504), None)
    assert w.code == "loss_interval" and "±73%" in w.message
    ws = check_intervals(0.866, (0.246, math.inf), (math.nan, math.inf))  # overflowing laws
    assert ["unbounded" in w.message for w in ws] == [True, True]


def test_fit_file_without_ranges_or_bootstrap_says_so():
    ws = check_fit_file({"version": 1, "fit": {"warnings": ["E is at its lower bound"]}})
    assert _codes(ws) == ["fit_file_ranges", "no_interval", "fit"]
    assert "version 1" in ws[0].message and "E is at its lower bound" in ws[2].message
    law = {"k": 1.0, "gamma": 2.0}
    ws = check_fit_file({"data_range": MICRO, "bootstrap": {"x": 1}, "batch_size_law": law})
    assert _codes(ws) == ["fit_file_ranges"] and "batch-size law" in ws[0].message
    assert check_fit_file({"data_range": MICRO, "bootstrap": {"x": 1}, "fit": {}}) == []


# -- make_plan: the checks applied ----------------------------------------------------------------


def test_demo_like_plan_is_flagged_not_presented_as_a_finding():
    law = {"k": 1e5, "gamma": 8.0, "loss_range": [2.1, 2.9]}  # fitted on the proxies' losses
    plan = make_plan(_fit(MICRO, batch_size_law=law), budget_flops=1e21)
    codes = _codes(plan.warnings)
    assert {"extrapolation", "tokens_per_param", "batch_law_range"} <= set(codes), codes
    assert not plan.refused and plan.steps >= MIN_STEPS
    assert plan.tokens_per_param_interval is not None
    text = plan.to_yaml()
    assert text.startswith("# @package _global_\n")
    assert "# WARNING (extrapolation)" in text and "# WARNING (batch_law_range)" in text
    d = json.loads(json.dumps(plan.to_dict()))
    assert [w["code"] for w in d["warnings"]] == codes
    assert set(d["warnings"][0]) == {"code", "message", "todo", "action"}


def test_plan_within_the_fit_has_no_warnings():
    span = {"N": [1e8, 3e9], "D": [2e9, 2e11], "C": [1e18, 3e21], "tokens_per_param": [20, 100]}
    plan = make_plan(_fit(span), budget_flops=1e21)
    assert plan.warnings == [], [w.line() for w in plan.warnings]


def test_too_few_steps_refused_or_reported():
    fit = _fit(MICRO)
    with pytest.raises(PlanRefusedError, match=r"optimizer steps .*--batch-tokens"):
        make_plan(fit, params=1e8, tokens=1e9, batch_tokens=2e7)
    plan = make_plan(fit, params=1e8, tokens=1e9, batch_tokens=2e7, refuse=False)
    assert plan.refused and plan.steps == 1e9 // (round(2e7 / 4096) * 4096)
    lines = plan.to_yaml().splitlines()
    assert lines[0] == "# @package _global_" and lines[1].startswith("# REFUSED (steps): ")
    with pytest.raises(InputError, match="--batch-tokens must be positive"):
        make_plan(fit, params=1e8, tokens=1e9, batch_tokens=0)


def test_batch_tokens_replace_the_law_and_tiny_batches_are_clamped():
    plan = make_plan(_fit(MICRO), params=1e8, tokens=1e10, batch_tokens=1e6)
    assert plan.batch_tokens == 1e6 and plan.batch_size == round(1e6 / 4096)
    assert any("set by the caller" in n for n in plan.notes)
    plan = make_plan(_fit(MICRO), params=1e8, tokens=1e10, batch_tokens=100.0)
    assert plan.batch_size == 1 and "batch_clamped" in _codes(plan.warnings)


# -- the fit file's ranges ----------------------------------------------------------------------


def test_fit_file_records_the_fitted_ranges():
    N = np.repeat([1e5, 3e5, 1e6, 3e6], 3)
    D = N * np.tile([10.0, 20.0, 40.0], 4)
    df = pd.DataFrame({"N": N, "D": D, "loss": MINICPM.predict(N, D)})
    fit_file, *_ = analyze(df, n_boot=0)
    assert fit_file["version"] == FIT_FILE_VERSION == 2
    span = fit_file["data_range"]
    assert span["tokens_per_param"] == pytest.approx([10.0, 40.0])
    assert span["C"] == pytest.approx([6e11, 6 * 3e6 * 1.2e8])
    assert span["loss"] == pytest.approx([df["loss"].min(), df["loss"].max()])


def test_version_1_fit_file_is_upgraded_from_its_points(tmp_path):
    old = _fit({"N": [6e3, 1.9e5], "D": [6e4, 7.6e6], "C": [2.2e9, 8.6e12]})
    old["version"] = 1
    (tmp_path / "fit.json").write_text(json.dumps(old))
    fit = load_fit_file(tmp_path)
    assert "tokens_per_param" not in fit["data_range"]  # no points.csv next to it
    assert "fit_file_ranges" in _codes(make_plan(fit, budget_flops=1e21).warnings)
    pd.DataFrame({"N": [6e3, 1.9e5], "D": [6e4, 7.6e6], "loss": [3.0, 2.0]}).to_csv(
        tmp_path / "points.csv", index=False
    )
    fit = load_fit_file(tmp_path / "fit.json")
    assert fit["data_range"]["tokens_per_param"] == pytest.approx([10.0, 40.0])
    assert "fit_file_ranges" not in _codes(make_plan(fit, budget_flops=1e21).warnings)
    (tmp_path / "fit.json").write_text(json.dumps({**old, "version": 3}))
    with pytest.raises(InputError, match="version-3 fit file; this windtunnel reads versions 1, 2"):
        load_fit_file(tmp_path)
