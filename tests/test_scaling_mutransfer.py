"""μTransfer with the resolution to decide: per-width optima with intervals, the slope across
widths, and the verdict (stable / not stable / cannot tell) on synthetic lr sweeps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling.errors import InputError, TooFewPointsError
from windtunnel.scaling.mutransfer import design_checks, transfer_verdict, width_optimum

FACTOR2 = [0.0025 * 2**k for k in range(7)]  # 0.0025 … 0.16


def _sweep(widths, lrs, opt, *, noise=0.003, seeds=1, curvature=0.05, skew=0.004, seed=0):
    """Loss = 2 + curvature·u² + skew·u³ (+ noise) with u = log2(lr/opt(width)): steeper on the
    high-lr side, like real sweeps; one row per run."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in widths:
        for lr in lrs:
            u = math.log2(lr / opt(w))
            for _ in range(seeds):
                y = 2.0 + curvature * u * u + skew * u**3 + noise * rng.standard_normal()
                rows.append({"width": w, "lr": lr, "loss": y})
    return pd.DataFrame(rows)


def test_stable_when_the_optimum_stays_put():
    v = transfer_verdict(_sweep([16, 32, 64], FACTOR2, lambda w: 0.01))
    assert v.verdict == "stable", v.why
    assert abs(v.slope) <= 0.1 and v.slope_interval[0] < 0 < v.slope_interval[1]
    for o in v.optima:
        assert o.lr_lo < 0.01 < o.lr_hi and o.issue == "" and o.n_basin == 5
        assert o.lr_hi / o.lr_lo < 2  # located well within one grid step
    assert all(c.ok for c in v.design)
    assert "within ±0.1 and covering 0" in v.why


def test_not_stable_when_the_optimum_drifts_with_width():
    lrs = [0.001 * 2**k for k in range(9)]
    v = transfer_verdict(_sweep([16, 32, 64], lrs, lambda w: 0.01 * (w / 16) ** -0.6))
    assert v.verdict == "not stable", v.why
    lo, hi = v.slope_interval
    assert lo < -0.6 < hi and hi < -0.1
    assert "moves as width^-0.6" in v.why and "excluding 0" in v.why


def test_cannot_tell_on_a_coarse_narrow_design_and_says_what_is_missing():
    """The demo's old design: 3 lrs a factor 4 apart at widths 32-64."""
    v = transfer_verdict(_sweep([32, 48, 64], [0.0025, 0.01, 0.04], lambda w: 0.01))
    assert v.verdict == "cannot tell"
    for missing in ("lrs per width 3 (need ≥ 5)", "lr spacing ×4 (need ≤ ×2)",
                    "width range ×2 (need ≥ ×4)", "no estimate of the noise"):  # fmt: skip
        assert missing in v.why, (missing, v.why)
    assert {c.name: c.ok for c in v.design} == {
        "lrs per width": False, "lr spacing": False, "widths": True, "width range": False
    }  # fmt: skip


def test_cannot_tell_when_the_optimum_is_at_the_edge_of_the_grid():
    v = transfer_verdict(_sweep([16, 32, 64], FACTOR2[:5], lambda w: 0.05))
    assert v.verdict == "cannot tell"
    assert "widths 16, 32, 64: the best lr is the largest swept" in v.why
    assert all(o.lr_lo is None and o.lr_hi is None for o in v.optima)


def test_cannot_tell_when_noise_swamps_the_grid():
    v = transfer_verdict(_sweep([16, 32, 64], FACTOR2[1:6], lambda w: 0.01, noise=0.05))
    assert v.verdict == "cannot tell", v.why
    assert "interval" in v.why


def test_seed_repeats_give_the_noise():
    df = _sweep([32], [0.005, 0.01, 0.02], lambda w: 0.01, noise=0.002, seeds=4, skew=0.0)
    o = width_optimum(df["lr"], df["loss"], width=32)
    assert o.noise_from == "seeds" and o.noise == pytest.approx(0.002, rel=0.6)
    assert o.lr_lo < 0.01 < o.lr_hi
    exact = _sweep([32], [0.005, 0.01, 0.02], lambda w: 0.01, noise=0.0)
    o = width_optimum(exact["lr"], exact["loss"], width=32)
    assert o.noise_from == "none" and o.lr_lo is None and "no estimate of the noise" in o.issue
    assert o.lr_opt == pytest.approx(0.01, rel=0.05)  # the vertex, without an interval


def test_diverged_points_leave_the_basin():
    df = _sweep([32], FACTOR2, lambda w: 0.01)
    df.loc[df["lr"] == FACTOR2[5], "loss"] = np.nan  # diverged
    df.loc[df["lr"] == FACTOR2[4], "loss"] = 9.0  # nearly: far above the basin
    o = width_optimum(df["lr"], df["loss"], width=32)
    assert o.n_basin == 4 and o.lr_lo < 0.01 < o.lr_hi


def test_the_demo_sweep_before_this_check():
    """The demo's recorded sweep (bpb; 3 lrs ×4 apart at d_model 32/48/64) could not decide."""
    bpb = {32: (3.2994, 2.9059, 3.3517), 48: (2.5429, 2.4196, 2.5607), 64: (2.2180, 2.1464, 2.3900)}
    rows = [{"width": w, "lr": lr, "bpb": y}
            for w, ys in bpb.items() for lr, y in zip((0.004013, 0.01605, 0.06421), ys)]  # fmt: skip
    v = transfer_verdict(pd.DataFrame(rows), target="bpb")
    assert v.verdict == "cannot tell" and v.slope == pytest.approx(-0.45, abs=0.02)
    assert v.slope_interval is None


def test_inputs():
    df = _sweep([32], FACTOR2, lambda w: 0.01)
    with pytest.raises(TooFewPointsError, match="≥2 widths"):
        transfer_verdict(df)
    with pytest.raises(InputError, match="'bpb' not in the table"):
        transfer_verdict(df, target="bpb")
    checks = design_checks(_sweep([16, 64], FACTOR2, lambda w: 0.01), width_col="width",
                           lr_col="lr")  # fmt: skip
    assert [(c.name, c.ok, c.have) for c in checks] == [
        ("lrs per width", True, "7"), ("lr spacing", True, "×2"), ("widths", False, "2"),
        ("width range", True, "×4"),
    ]  # fmt: skip


def test_windtunnel_fit_reads_the_verdict_from_the_longest_runs():
    """A fit table with lr sweeps at several D per width: only the largest D enters the check
    (losses at other D are not seed noise)."""
    from windtunnel.scaling import DataModelLaw
    from windtunnel.scaling.analyze import analyze

    law = DataModelLaw(E=1.6, A=350.0, B=900.0, alpha=0.32, beta=0.3)
    rows = [
        {"N": N, "D": N * m, "width": w, "lr": lr,
         "loss": law.predict(N, N * m) * (1 + 0.01 * math.log2(lr / 0.01) ** 2)}
        for w, N in ((16, 1e7), (32, 4e7), (64, 1.6e8))
        for lr in FACTOR2[:5]
        for m in (10, 20, 40)
    ]  # fmt: skip
    fit_file, *_ = analyze(pd.DataFrame(rows), n_boot=0)
    assert fit_file["diagnostics"]["mutransfer"]["verdict"] == "stable"
