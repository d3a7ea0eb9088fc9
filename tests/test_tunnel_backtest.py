"""The tunnel's back-test stage on synthetic ladders (no training): the rollout with intervals and
coverage, the fallback for short ladders, failed folds, old state, the spec's settings."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling import DataModelLaw, ScalingError
from windtunnel.scaling.synthetic import synthetic_points
from windtunnel.tunnel.report import write_report
from windtunnel.tunnel.spec import BACKTEST_MODES, BacktestStage, TunnelConfig, TunnelSpec
from windtunnel.tunnel.stage import Context
from windtunnel.tunnel.stages.backtest import (
    STAGE,
    BacktestResult,
    backtest_verdict,
    bias_sentence,
    binomial_range,
)
from windtunnel.tunnel.stages.ladder import POINT_COLUMNS, LadderPoint, LadderResult

scaling_backtest = importlib.import_module("windtunnel.scaling.backtest")  # the package exports
# a function of that name
LAW = DataModelLaw.from_minicpm(C_N=7.15e-2, C_D=3.00e-1, alpha=0.29, beta=0.23, L0=0.31)
MULTS = (10, 20, 40)


def _ladder(sizes: int, *, repeats: int = 1, noise: float = 0.004) -> pd.DataFrame:
    """``sizes`` model sizes × 3 decay branches (× ``repeats`` seeds), as the ladder stage keeps."""
    parts = [
        synthetic_points(LAW, np.geomspace(2e5, 2e7, sizes), MULTS, noise=noise, seed=s).assign(
            seed=s, N_head=0.0, N_total=0.0
        )
        for s in range(repeats)
    ]
    df = pd.concat(parts, ignore_index=True)
    df["model"] = [f"m{int(np.log(n / 2e5) / np.log(100) * (sizes - 1) + 0.5)}" for n in df["N"]]
    df["run_id"] = None
    return df[POINT_COLUMNS]


def _context(tmp: Path, df: pd.DataFrame, **backtest: Any) -> Context:
    tf = TunnelSpec(
        tunnel=TunnelConfig(name="bt", dir=str(tmp), backtest=BacktestStage(**backtest))
    )
    tf.tunnel.fit.target = "loss"
    points = [LadderPoint(**r) for r in df.to_dict(orient="records")]
    done = {"status": "done", "result": dataclasses.asdict(LadderResult(points=points))}
    return Context(tf, {"stages": {"ladder": done}})


def _saved(r: BacktestResult) -> dict[str, Any]:
    """The result as state.json keeps it."""
    out: dict[str, Any] = json.loads(json.dumps(STAGE.dump(r), default=str))
    return out


def _report(tmp: Path, r: BacktestResult | dict[str, Any]) -> str:
    raw = r if isinstance(r, dict) else _saved(r)
    done = {"status": "done", "key": "k", "seconds": 2.0, "result": raw}
    md = write_report(tmp / "report", {"tunnel": {"name": "bt"}, "stages": {"backtest": done}})
    text = md["markdown"].read_text()
    return text[text.index("## Back-test") : text.index("## Stages without a result")]


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BacktestResult]:
    """6 sizes × 3 branches: folds k = 3, 4, 5 predict 9 + 6 + 3 points."""
    tmp = tmp_path_factory.mktemp("rollout")
    return tmp, STAGE.run(_context(tmp, _ladder(6)))


def test_rollout_table_coverage_headline_metrics(rollout: tuple[Path, BacktestResult]) -> None:
    tmp, r = rollout
    assert r.mode == "rollout" and r.level == 0.9 and r.n_sizes == 6 and not r.fallback
    assert [(f["fit_sizes"], f["held_out"]) for f in r.folds] == [
        (3, [4, 5, 6]),
        (4, [5, 6]),
        (5, [6]),
    ]
    assert [p["k"] for p in r.points] == [3] * 9 + [4] * 6 + [5] * 3
    for p in r.points:
        assert p["lo"] <= p["predicted"] <= p["hi"]
        assert p["inside"] == (p["lo"] <= p["observed"] <= p["hi"])
        assert p["rel_error"] == pytest.approx(p["predicted"] / p["observed"] - 1)
        assert p["model"] == f"m{round(np.log(p['N'] / 2e5) / np.log(100) * 5)}"
    inside = sum(p["inside"] for p in r.points)
    errors = [abs(p["rel_error"]) for p in r.points]
    ext = [p["extrapolation"] for p in r.points]
    assert r.coverage == pytest.approx(inside / 18)
    assert r.max_abs_rel_error == pytest.approx(max(errors))
    # the largest size from the 5 below it: what the back-test reported before the rollout
    last = [p for p in r.points if p["k"] == 5]
    assert r.largest["k"] == 5 and r.largest["n"] == 3
    assert r.largest["max_abs_rel_error"] == pytest.approx(max(abs(p["rel_error"]) for p in last))
    assert STAGE.headline(r) == (
        f"rollout: 18 held-out points, 90% coverage {inside}/18, max |error| "
        f"{max(errors):.2%} at {min(ext):.1f}–{max(ext):.1f}×"
    )
    assert STAGE.metrics(r) == pytest.approx(
        {
            "backtest.coverage": inside / 18,
            "backtest.max_abs_rel_error": max(errors),
            "backtest.mean_abs_rel_error": float(np.mean(errors)),
            "backtest.min_extrapolation": min(ext),
            "backtest.max_extrapolation": max(ext),
            "backtest.n_points": 18.0,
        }
    )
    assert sum(b["n"] for b in r.buckets) == 18
    assert r.noise["source"] in ("residuals", "floor") and r.noise["k"] == 5
    assert Path(r.plots[0]) == tmp / "bt" / "plots" / "backtest.png"
    assert Path(r.plots[0]).read_bytes()[:4] == b"\x89PNG"


def test_rollout_section_in_the_report(rollout: tuple[Path, BacktestResult]) -> None:
    tmp, r = rollout
    md = _report(tmp, r)
    assert md.startswith("## Back-test\n\nRollout back-test: for every k ≥ 3 the law is fitted")
    rows = re.findall(
        r"^\| (\d) \| (m\d) \([^)]+\) \|.*\| (yes|NO) \| ([-+]\d+\.\d\d)% \|", md, re.M
    )
    assert [int(k) for k, *_ in rows] == [p["k"] for p in r.points]
    assert [float(e) for *_, e in rows] == pytest.approx(
        [100 * p["rel_error"] for p in r.points], abs=0.006
    )
    p0 = r.points[0]
    assert f"| [{p0['lo']:.4f}, {p0['hi']:.4f}] |" in md  # the 90% interval of each point
    inside = sum(p["inside"] for p in r.points)
    assert f"Coverage: {inside} of 18 held-out points" in md
    assert "With only 18 points this is a coarse check: honest intervals would put 13–18" in md
    assert "| extrapolation | points | mean abs. error | max abs. error | coverage |" in md
    for b in r.buckets:
        assert f"| {b['range']} | {b['n']} | {b['mean_abs_rel_error']:.2%} |" in md
    assert "Noise floor: no repeated points in the ladder" in md
    assert f"σ = {r.noise['sd']:.2%}" in md
    assert backtest_verdict(r) in md and "![back-test: backtest.png]" in md
    assert "The largest size, predicted from the 5 sizes below it" in md


def test_short_ladder_falls_back_to_largest_and_measures_seed_noise(tmp_path: Path) -> None:
    """3 sizes have no rollout fold; two seeds per point give the noise floor its seed noise."""
    r = STAGE.run(_context(tmp_path, _ladder(3, repeats=2)))
    assert r.mode == "largest" and r.n_sizes == 3 and len(r.points) == 6
    assert {p["k"] for p in r.points} == {2} and {p["model"] for p in r.points} == {"m2"}
    assert "this ladder has 3, so the back-test fell back to holding out the largest" in r.fallback
    assert STAGE.headline(r).startswith("largest: 6 held-out points, 90% coverage ")
    assert STAGE.headline(r).endswith("(too few sizes for a rollout: 3)")
    md = _report(tmp_path, r)
    assert r.fallback in md and "The largest model size held out" in md
    assert r.noise["source"] == "seed" and r.noise["dof"] == 9
    sd = r.noise["sd"]
    assert f"Noise floor: the seed noise of the ladder's repeated points: σ = {sd:.2%} (9 " in md


def test_too_few_sizes_for_any_backtest_is_a_result_not_a_crash(tmp_path: Path) -> None:
    r = STAGE.run(_context(tmp_path, _ladder(2)))
    assert r.skipped.startswith("a back-test needs ≥3 model sizes")
    assert STAGE.headline(r) == f"no back-test: {r.skipped}"
    assert STAGE.metrics(r) == {}
    assert STAGE.load(_saved(r)).skipped == r.skipped
    assert f"No back-test: {r.skipped}." in _report(tmp_path, r)


def test_a_fold_that_fails_to_fit_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit = scaling_backtest.fit_data_model

    def k3_fails(df: pd.DataFrame, **kw: Any) -> Any:
        if df["N"].nunique() == 3:
            raise ScalingError("the fit did not converge (test)")
        return fit(df, **kw)

    monkeypatch.setattr(scaling_backtest, "fit_data_model", k3_fails)
    r = STAGE.run(_context(tmp_path, _ladder(5), mode="rollout"))
    assert {p["k"] for p in r.points} == {4}  # k = 3 failed, k = 4 predicted size 5
    assert STAGE.headline(r).endswith("; 1 fold(s) failed to fit")
    md = _report(tmp_path, r)
    assert "Folds that failed to fit (their points are missing from the table):" in md
    assert "- k = 3 (held out sizes 4, 5): the fit did not converge (test)" in md


def test_state_round_trip_and_old_results(rollout: tuple[Path, BacktestResult]) -> None:
    tmp, r = rollout
    raw = _saved(r)
    assert STAGE.load(raw) == r and _saved(STAGE.load(raw)) == raw
    # state.json of a windtunnel before the rollout: the largest size, no intervals
    old = {
        "max_abs_rel_error": 0.0084,
        "mean_abs_rel_error": 0.0045,
        "mode": "largest",
        "points": [
            {"N": 3e6, "D": 3e7, "observed": 1.3579, "predicted": 1.3537,
             "rel_error": -0.0031, "extrapolation": 10.4},
            {"N": 3e6, "D": 6e7, "observed": 1.2676, "predicted": 1.2782,
             "rel_error": 0.0084, "extrapolation": 20.8},
        ],
        "target_error": 0.01,
        "min_extrapolation": 10.4,
        "plots": [],
    }  # fmt: skip
    o = STAGE.load(old)
    assert o.level is None and o.coverage is None
    assert (
        STAGE.headline(o) == "held-out largest size: max |error| 0.84% at ≥10.4× the fitted compute"
    )
    assert STAGE.metrics(o) == {
        "backtest.max_abs_rel_error": 0.0084,
        "backtest.mean_abs_rel_error": 0.0045,
        "backtest.min_extrapolation": 10.4,
        "backtest.n_points": 2.0,
    }
    md = _report(tmp, old)
    assert "Could not show" not in md and "Target met" in md
    assert "| — | 3M | 30M | 1.3579 | 1.3537 | — | — | -0.31% | 10.4× |" in md
    assert "Coverage" not in md and "Noise floor" not in md


def test_verdict_judges_the_points_at_10x(rollout: tuple[Path, BacktestResult]) -> None:
    _, r = rollout
    far = [p for p in r.points if p["extrapolation"] >= 10]
    worst = max(abs(p["rel_error"]) for p in far)
    assert worst > 0.01  # the 4 mpx noise on a 100x range: not met at 1%
    assert backtest_verdict(r) == (
        f"Target not met (≤1.00% at ≥10×): the max |error| at ≥10× is {worst:.2%}, above 1.00%."
    )
    loose = dataclasses.replace(r, target_error=0.05)
    assert backtest_verdict(loose) == (
        f"Target met: ≤5.00% at ≥10× the fitted compute (max |error| {worst:.2%} over the "
        f"{len(far)} points at ≥{min(p['extrapolation'] for p in far):.1f}×)."
    )
    near = dataclasses.replace(r, points=[p for p in r.points if p["extrapolation"] < 10])
    farthest = max(p["extrapolation"] for p in near.points)
    assert f"no held-out point reaches 10× the fitted compute (the farthest is {farthest:.1f}×" in (
        backtest_verdict(near)
    )


def test_one_sided_errors_are_called_a_bias(rollout: tuple[Path, BacktestResult]) -> None:
    """Held-out errors of one sign beyond the noise band are the law's bias (what the long CPU
    ladder showed: every point predicted high), said in words; mixed signs, too few points or
    errors inside the noise band say nothing."""
    tmp, r = rollout
    base = r.points[0]

    def with_errors(errs: list[float], sd: float = 0.002) -> BacktestResult:
        pts = [{**base, "rel_error": e} for e in errs]
        return dataclasses.replace(r, points=pts, noise={**r.noise, "sd": sd})

    high = bias_sentence(with_errors([0.05, 0.08, 0.12, 0.2, -0.01]))
    assert high.startswith("Systematic: 4 of the 5 held-out points beyond the noise band are ")
    assert "predicted too high (mean error +8.80%)" in high and "smaller batches" in high
    low = bias_sentence(with_errors([-0.03, -0.04, -0.05, -0.06]))
    assert "4 of the 4" in low and "predicted too low (mean error -4.50%)" in low
    assert bias_sentence(with_errors([0.05, -0.05, 0.04, -0.04, 0.03])) == ""  # mixed
    assert bias_sentence(with_errors([0.05, 0.06, 0.07])) == ""  # too few to tell
    assert bias_sentence(with_errors([0.02, 0.03, 0.025, 0.02], sd=0.02)) == ""  # within noise
    assert "Systematic: 4 of the 4 held-out points" in _report(tmp, with_errors([0.05] * 4))


def test_binomial_range() -> None:
    from scipy.stats import binom

    assert binomial_range(9, 0.9) == (6, 9)
    for n in (3, 18, 25, 100):
        assert binomial_range(n, 0.9) == (binom.ppf(0.025, n, 0.9), binom.ppf(0.975, n, 0.9))


def test_spec_checks_mode_and_level() -> None:
    assert BACKTEST_MODES == scaling_backtest.MODES
    assert BacktestStage().mode == "rollout" and BacktestStage().level == 0.9
    for bad, msg in (
        ({"mode": "loo"}, "tunnel.backtest.mode='loo': rollout, largest, each"),
        ({"level": 1.5}, "tunnel.backtest.level=1.5: in (0, 1), e.g. 0.9"),
    ):
        tf = TunnelSpec(tunnel=TunnelConfig(backtest=BacktestStage(**bad)))
        with pytest.raises(ValueError, match=re.escape(msg)) as e:
            tf.validate()
        assert "\n" not in str(e.value)
    TunnelSpec(tunnel=TunnelConfig(backtest=BacktestStage(mode="each", level=0.8))).validate()


def test_coverage_sentence_says_when_intervals_are_too_narrow(
    rollout: tuple[Path, BacktestResult],
) -> None:
    tmp, r = rollout
    missed = [{**p, "inside": i % 2 == 0} for i, p in enumerate(r.points)]  # 9 of 18 inside
    md = _report(tmp, dataclasses.replace(r, points=missed, coverage=0.5))
    assert "Coverage: 9 of 18 held-out points (50%)" in md
    assert "9 is fewer than that: the intervals are too narrow." in md
    assert md.count("| NO |") == 9
