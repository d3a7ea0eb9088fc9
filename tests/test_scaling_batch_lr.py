"""Batch-size law (MiniCPM iso-loss method), DeepSeek compute laws, μTransfer check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling import ScalingError, TooFewPointsError
from windtunnel.scaling.batch_lr import (
    DEEPSEEK_BATCH,
    DEEPSEEK_LR,
    MINICPM_BATCH_LAW,
    batch_size_law_iso_loss,
    fit_compute_laws,
    mutransfer_check,
    tokens_to_reach,
)


def _curves(k, gamma, batch_sizes, c=0.15):
    """Loss curves whose tokens-to-reach each level are minimal at bs_opt(L) = k / L^γ."""
    rows = []
    levels = np.linspace(2.4, 3.8, 400)
    for i, b in enumerate(batch_sizes):
        lopt = np.log(k / levels**gamma)
        T = 1e8 * (levels - 2.0) ** -8.0 * np.exp(c * (np.log(b) - lopt) ** 2)
        assert np.all(np.diff(T) < 0)  # more tokens → lower loss
        for t, level in zip(T, levels):
            rows.append({"run_id": f"r{i}", "batch_tokens": b, "tokens": t, "loss": level})
    return pd.DataFrame(rows)


def test_iso_loss_method_recovers_minicpm_batch_law():
    k, g = MINICPM_BATCH_LAW["k"], MINICPM_BATCH_LAW["gamma"]
    bs = np.geomspace(2**16, 2**24, 11)
    curves = _curves(k, g, bs)
    law = batch_size_law_iso_loss(curves, [2.6, 2.8, 3.0, 3.3, 3.6], group_col=None)
    assert law.gamma == pytest.approx(g, rel=0.01)
    assert law.k == pytest.approx(k, rel=0.05)
    assert law(3.0) == pytest.approx(k / 3.0**g, rel=0.01)
    assert law.points["centred"].all()


def test_a_batch_that_shrinks_as_the_loss_falls_is_not_a_law():
    """Optima with γ < 0 (as one size's curves can give): refused with the reason, never
    reported as a law or used by the planner."""
    curves = _curves(200.0, -3.0, np.geomspace(2**4, 2**12, 9))
    with pytest.raises(ScalingError, match=r"shrinks as the loss falls"):
        batch_size_law_iso_loss(curves, [2.6, 2.8, 3.0, 3.3, 3.6], group_col=None)


def test_iso_loss_needs_three_batch_sizes():
    curves = _curves(1.21e9, 6.24, [2**16, 2**18])
    with pytest.raises(TooFewPointsError, match="iso-loss"):
        batch_size_law_iso_loss(curves, [3.0, 3.5], group_col=None)


def test_tokens_to_reach_interpolates_and_reports_unreached():
    t = np.array([1e6, 2e6, 4e6])
    y = np.array([4.0, 3.0, 2.5])
    assert tokens_to_reach(t, y, 3.5) == pytest.approx(np.sqrt(2) * 1e6)
    assert np.isnan(tokens_to_reach(t, y, 2.0))


def test_deepseek_compute_laws_round_trip():
    C = np.geomspace(1e17, 3e20, 8)
    laws = fit_compute_laws(C, DEEPSEEK_LR(C), DEEPSEEK_BATCH(C))
    assert laws["lr"].p == pytest.approx(-0.125)
    assert laws["lr"].k == pytest.approx(0.3118)
    assert laws["batch"].p == pytest.approx(0.3271)


def _lr_sweep(widths, lr_opt_of_w):
    rows = []
    for w in widths:
        for lr in np.geomspace(1e-3, 1e-1, 9):
            loss = 3.0 + 0.05 * (np.log(lr) - np.log(lr_opt_of_w(w))) ** 2
            rows.append({"width": w, "lr": lr, "loss": loss})
    return pd.DataFrame(rows)


def test_mutransfer_stable_and_unstable():
    ok = mutransfer_check(_lr_sweep([64, 128, 256, 512], lambda w: 0.01))
    assert ok.stable
    assert ok.table["lr_opt"].to_numpy() == pytest.approx(0.01, rel=1e-6)
    bad = mutransfer_check(_lr_sweep([64, 128, 256, 512], lambda w: 0.01 * 128 / w))
    assert not bad.stable
    assert bad.slope == pytest.approx(-1.0, abs=0.01)
