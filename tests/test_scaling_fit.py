"""Data–model fit: published anchors, synthetic recovery, objective-scale invariance, errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED

from windtunnel.scaling import (
    ConvergenceError,
    DataModelLaw,
    InputError,
    NonFiniteError,
    NonPositiveError,
    NotIdentifiableError,
    ScalingError,
    TooFewPointsError,
    fit_data_model,
    fit_points,
)

ANCHORS = SHARED / "anchors" / "data"
EPOCH_CSV = ANCHORS / "epoch_chinchilla_svg_extracted_data.csv"
# Besiroglu et al. 2024 ("Chinchilla scaling: a replication attempt"), approach 3.
EPOCH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
CHINCHILLA = DataModelLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _need(path):
    if not path.exists():
        pytest.skip(f"anchor data absent: {path} (the shared anchors folder is not checked out)")


@pytest.fixture(scope="module")
def epoch_points():
    _need(EPOCH_CSV)
    d = pd.read_csv(EPOCH_CSV)
    d["N"] = d["Model Size"]
    d["D"] = d["Training FLOP"] / (6 * d["Model Size"])
    # Epoch drops the 5 highest-loss rows (`loss < sorted(loss)[-5]`), leaving 240.
    d = d[d["loss"] < np.sort(d["loss"].to_numpy())[-5]].reset_index(drop=True)
    assert len(d) == 240
    return d


@pytest.fixture(scope="module")
def epoch_fit(epoch_points):
    return fit_data_model(epoch_points)


def test_epoch_chinchilla_approach3_reproduced(epoch_fit, epoch_points):
    f = epoch_fit
    assert f.n_points == 240
    assert pytest.approx(EPOCH["E"], abs=0.005) == f.E
    assert f.alpha == pytest.approx(EPOCH["alpha"], abs=0.001)
    assert f.beta == pytest.approx(EPOCH["beta"], abs=0.002)
    assert pytest.approx(EPOCH["A"], rel=0.015) == f.A
    assert pytest.approx(EPOCH["B"], rel=0.03) == f.B
    # The published point lies on the flat (A, B, β) ridge; ours is at least as good a minimum
    # of the same objective (it is slightly lower: the published fit stopped short on the ridge).
    pub = DataModelLaw(**EPOCH)
    r_pub = np.log(pub.predict(epoch_points.N, epoch_points.D)) - np.log(epoch_points.loss)
    d = 1e-3
    h = np.where(np.abs(r_pub) <= d, 0.5 * r_pub**2, d * (np.abs(r_pub) - d / 2)).mean()
    assert f.objective <= h
    # the global optimum we reach, pinned (regression guard)
    assert pytest.approx(477.83, rel=1e-3) == f.A
    assert pytest.approx(2143.4, rel=1e-3) == f.B
    assert f.grad_norm < 1e-4
    assert not f.warnings


def test_sum_and_mean_objectives_give_the_same_answer(epoch_points, epoch_fit):
    s = fit_data_model(epoch_points, reduction="sum")
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(s, k) == pytest.approx(getattr(epoch_fit, k), rel=1e-6)
    assert s.objective == pytest.approx(epoch_fit.objective, rel=1e-9)


def test_never_stops_at_its_start(epoch_points, epoch_fit):
    # one exponent start (Chinchilla's own α, β) and Chinchilla's published law as a user start:
    # both must move to the global optimum
    f = fit_data_model(
        epoch_points, grid=(np.array([0.34]), np.array([0.28])), x0=[CHINCHILLA], n_polish=1
    )
    assert f.alpha != pytest.approx(0.34, abs=1e-3)
    assert f.alpha == pytest.approx(epoch_fit.alpha, rel=1e-4)
    assert pytest.approx(epoch_fit.B, rel=1e-3) == f.B


def test_non_convergence_raises(epoch_points):
    with pytest.raises(ConvergenceError, match="did not converge"):
        fit_data_model(epoch_points, grid=(np.array([1.2]), np.array([1.2])), maxiter=1)


def _synthetic(law, sizes, mults, noise, seed=0):
    rng = np.random.default_rng(seed)
    N = np.repeat(sizes, len(mults)).astype(float)
    D = (N * np.tile(mults, len(sizes))).astype(float)
    L = law.predict(N, D) * np.exp(noise * rng.standard_normal(len(N)))
    return pd.DataFrame({"N": N, "D": D, "loss": L})


def test_recovers_known_parameters_exactly_without_noise():
    df = _synthetic(CHINCHILLA, np.geomspace(1e7, 2e9, 6), [5, 10, 20, 40, 80], 0.0)
    f = fit_data_model(df)
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(f, k) == pytest.approx(getattr(CHINCHILLA, k), rel=2e-3), k


def test_recovers_known_parameters_from_noisy_data():
    truth = DataModelLaw(E=1.5, A=300.0, B=1500.0, alpha=0.3, beta=0.35)
    df = _synthetic(truth, np.geomspace(1e7, 3e9, 8), [5, 10, 20, 40, 80, 160], 0.005, seed=1)
    f = fit_data_model(df)
    assert f.alpha == pytest.approx(truth.alpha, abs=0.05)
    assert f.beta == pytest.approx(truth.beta, abs=0.05)
    assert pytest.approx(truth.E, abs=0.1) == f.E
    # predictions two orders of magnitude beyond the data stay close
    N, D = 3e11, 6e12
    assert f.predict(N, D) == pytest.approx(truth.predict(N, D), rel=0.02)
    assert f.rms_log_residual == pytest.approx(0.005, rel=0.4)


def test_bpb_target_and_minicpm_form():
    truth = DataModelLaw.from_minicpm(C_N=7.15e-2, C_D=3.0e-1, alpha=0.29, beta=0.23, L0=0.31)
    df = _synthetic(truth, np.geomspace(9e6, 5e8, 6), [10, 20, 40, 60], 0.0)
    df = df.rename(columns={"loss": "bpb"})
    f = fit_data_model(df, target="bpb", form="minicpm")
    co = f.to_dict()["minicpm"]
    assert co["C_N"] == pytest.approx(7.15e-2, rel=1e-2)
    assert co["L0"] == pytest.approx(0.31, rel=1e-2)
    assert f.target == "bpb"


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda d: d.iloc[:5], TooFewPointsError, "too few points"),
        (lambda d: d.assign(loss=d.loss.where(d.index != 3)), NonFiniteError, "NaN"),
        (lambda d: d.assign(N=d.N.where(d.index != 2, 0.0)), NonPositiveError, "non-positive"),
        (lambda d: d.assign(D=d.D.where(d.index != 2, -5.0)), NonPositiveError, "'D'"),
        (
            lambda d: d.assign(N=1e8),
            NotIdentifiableError,
            "α is not identifiable: all points have the same N",
        ),
        (lambda d: d.assign(D=1e10), NotIdentifiableError, "β is not identifiable"),
        (
            lambda d: d.groupby("N").head(1).pipe(lambda x: x.assign(D=20 * x.N)),
            NotIdentifiableError,
            "α and β are not separately identifiable",
        ),
    ],
)
def test_clear_errors(mutate, error, match):
    df = _synthetic(CHINCHILLA, np.geomspace(1e7, 2e9, 8), [5, 20, 80], 0.0)
    with pytest.raises(error, match=match) as ei:
        fit_data_model(mutate(df.copy()))
    assert isinstance(ei.value, ScalingError) and isinstance(ei.value, ValueError)


def test_missing_column_and_bad_options():
    df = _synthetic(CHINCHILLA, np.geomspace(1e7, 2e9, 4), [5, 20, 80], 0.0)
    with pytest.raises(InputError, match="'bpb'"):
        fit_data_model(df, target="bpb")
    with pytest.raises(InputError, match="unknown form"):
        fit_points(df.N, df.D, df.loss, form="nope")


def test_unidentified_E_is_reported_not_hidden():
    # pure power laws without an irreducible term: E must end at its bound with a warning
    law = DataModelLaw(E=0.0, A=50.0, B=80.0, alpha=0.2, beta=0.25)
    N = np.repeat(np.geomspace(1e5, 1e7, 5), 4)
    D = N * np.tile([10, 20, 40, 80], 5)
    f = fit_points(N, D, law.predict(N, D))
    assert f.E < 1e-3
    assert any("E is at its lower bound" in w for w in f.warnings)
    assert math.isfinite(f.alpha)


def test_backtest_reports_error_and_extrapolation():
    from windtunnel.scaling.backtest import backtest

    truth = DataModelLaw(E=1.5, A=300.0, B=1500.0, alpha=0.3, beta=0.35)
    df = _synthetic(truth, np.geomspace(1e7, 3e9, 6), [10, 20, 40, 80], 0.002, seed=2)
    df["C"] = 6 * df.N * df.D
    bt = backtest(df)
    assert len(bt.table) == 4 and bt.mode == "largest"
    assert bt.max_abs_error < 0.02
    assert (bt.table["extrapolation"] > 1).any()
    each = backtest(df, mode="each", n_boot=10)
    assert len(each.table) == len(df)
    with pytest.raises(TooFewPointsError, match="≥3 model sizes"):
        backtest(df[df.N < 5e7])
