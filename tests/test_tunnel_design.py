"""The tunnel's experimental design: longest trials first, a token range per ladder size, seeds
and the noise floor they measure, the proxies' μP base width in the plan, and the verify stage
that trains the plan and compares it with the prediction."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from helpers import tiny_overrides

from windtunnel.config import resolve
from windtunnel.scaling import DataModelLaw
from windtunnel.scaling.analyze import analyze, json_summary
from windtunnel.scaling.intervals import fit_file_interval
from windtunnel.scaling.plan import make_plan
from windtunnel.scaling.synthetic import synthetic_points
from windtunnel.sweep import load_sweep
from windtunnel.sweep.driver import longest_first
from windtunnel.sweep.resources import trial_flops
from windtunnel.sweep.spec import grid_points
from windtunnel.sweep.template import trial_template
from windtunnel.tunnel import dry_run, load_tunnel
from windtunnel.tunnel.report import build
from windtunnel.tunnel.stage import Context
from windtunnel.tunnel.stages import fit as fit_stage
from windtunnel.tunnel.stages import ladder, verify
from windtunnel.tunnel.stages.fit import FitResult
from windtunnel.tunnel.stages.ladder import LadderPoint, LadderResult
from windtunnel.tunnel.stages.plan import PlanResult

SIZES = "sweep.space.size.choices=[micro_xxxs,micro_xxs,micro_xs]"
LAW = DataModelLaw(E=0.9, A=40.0, B=60.0, alpha=0.35, beta=0.3)


def _ladder_spec(tmp: Path, *extra: str) -> Any:
    return load_sweep(REPO / "sweeps/ladder.yaml", [f"sweep.dir={tmp}", SIZES, *extra])


def test_a_grid_starts_its_longest_trials_first(tmp_path: Path) -> None:
    spec = _ladder_spec(tmp_path, "train.branch_tokens_per_param=[80,160]", "train.min_steps=100")
    template = trial_template(spec)
    points = grid_points(spec.sweep.space)
    ordered = longest_first(spec, template, points)
    assert [p["size"] for p in ordered] == ["micro_xs", "micro_xxs", "micro_xxxs"]
    costs = [trial_flops(template.config(0, p)) for p in ordered]
    assert costs == sorted(costs, reverse=True) and costs[0] > 5 * costs[-1]
    # equal costs keep the grid's order (an lr grid is not shuffled)
    lr = load_sweep(REPO / "sweeps/lr_transfer.yaml", [f"sweep.dir={tmp_path}/lr"])
    lr_points = [p for p in grid_points(lr.sweep.space) if p["width"] == "micro_xxs"]
    assert longest_first(lr, trial_template(lr), lr_points) == lr_points


def test_each_size_takes_its_own_token_range(tmp_path: Path) -> None:
    spec = _ladder_spec(
        tmp_path,
        "train.branch_tokens_per_param=[10,20]",
        '+sweep.space.size.set.micro_xxxs=["train.branch_tokens_per_param=[80,160,320]"]',
    )
    configs = {k[0]: c for k, c in trial_template(spec).configs.items()}
    assert configs["micro_xxxs"].train.branch_tokens_per_param == [80.0, 160.0, 320.0]
    assert configs["micro_xs"].train.branch_tokens_per_param == [10.0, 20.0]
    # the far-out small rung now costs more than with the shared range
    assert trial_flops(configs["micro_xxxs"]) > 10 * trial_flops(
        trial_template(
            _ladder_spec(tmp_path / "b", "train.branch_tokens_per_param=[10,20]")
        ).configs[("micro_xxxs",)]
    )


@pytest.mark.parametrize(
    ("spec", "override", "message"),
    [
        ("ladder", '+sweep.space.size.set.micro_q=["train.seed=1"]', r"\['micro_q'\], not among"),
        ("lr_transfer", '+sweep.space.lr.set.x=["train.seed=1"]', "picks a config group"),
    ],
)
def test_bad_per_choice_overrides_are_refused(
    tmp_path: Path, spec: str, override: str, message: str
) -> None:
    loaded = load_sweep(REPO / f"sweeps/{spec}.yaml", [f"sweep.dir={tmp_path}", override])
    with pytest.raises(ValueError, match=message):
        trial_template(loaded)


def test_a_ladder_point_needs_its_minimum_of_steps(tmp_path: Path) -> None:
    spec = _ladder_spec(tmp_path, "train.branch_tokens_per_param=[1,2]", "train.min_steps=100")
    cfg = trial_template(spec).configs[("micro_xxxs",)]
    with pytest.raises(ValueError, match=r"train.min_steps=100"):
        resolve(cfg, cfg.data.vocab_size)


def test_seeds_multiply_the_ladder_and_the_dry_run_counts_them() -> None:
    one = {s.stage: s for s in dry_run(load_tunnel("demo", ["tunnel.ladder.seeds=1"])).stages}
    two = {s.stage: s for s in dry_run(load_tunnel("demo", ["tunnel.ladder.seeds=2"])).stages}
    assert two["ladder"].trials == 2 * one["ladder"].trials == 8
    assert two["ladder"].flops == pytest.approx(2 * one["ladder"].flops)
    with pytest.raises(ValueError, match=r"tunnel.ladder.seeds=0: 1 to 16"):
        load_tunnel("demo", ["tunnel.ladder.seeds=0"])


def _points(seeds: int, noise: float) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = synthetic_points(LAW, [6e3, 2.4e4, 8e4], (20, 40, 80))
    rows = [
        {**r, "bpb": r["bpb"] * math.exp(noise * rng.standard_normal()), "seed": s}
        for r in df.to_dict(orient="records")
        for s in range(seeds)
    ]
    return pd.DataFrame(rows)


def test_the_noise_floor_is_measured_from_seeds_and_said_when_it_is_not() -> None:
    from windtunnel.scaling.intervals import seed_noise

    df = _points(2, 0.01)
    sd, dof = seed_noise(df, target="bpb")
    assert dof == 9 and 0.003 < sd < 0.03  # 9 pairs at 1% noise
    pts = [LadderPoint(model="m", **r) for r in df.to_dict("records")]  # type: ignore[arg-type]
    r = LadderResult(points=pts, noise_sd=sd, noise_dof=dof)
    assert f"±{sd:.2%}" in ladder.STAGE.headline(r) and "2 seeds" in ladder.STAGE.headline(r)
    assert "9 degrees of freedom" in ladder.noise_sentence(r)
    assert "not measured" in ladder.noise_sentence(LadderResult(points=pts[:1]))


def test_the_fit_shows_other_budgets_as_extrapolations() -> None:
    df = synthetic_points(LAW, [6e3, 2.4e4, 8e4, 1.9e5], (10, 20, 40, 80), noise=0.002)
    fit_file, *_ = analyze(df, target="bpb", budgets=(6e12, 1e21), n_boot=20)
    blocks = fit_stage._ratio(json_summary(fit_file))
    table = next(b for b in blocks if isinstance(b, tuple) and b[0] == "table")
    rows = {row[0]: row for row in table[2]}
    assert set(rows) == {"6e+12", "1e+21"}
    assert rows["1e+21"][-1] == "extrapolation, not a finding" and rows["6e+12"][-1] == ""
    assert float(rows["1e+21"][1].rstrip("×")) > 1e6


def test_the_report_says_how_busy_the_cores_were() -> None:
    state = {
        "stages": {
            "ladder": {
                "status": "done",
                "seconds": 400.0,
                "result": dataclasses.asdict(LadderResult()) | {"summary": {"core_busy": 0.934}},
            }
        }
    }
    rows, _ = build(state)
    row = next(r for r in rows if r[0] == "ladder")
    assert row[3] == "93%"
    assert next(r for r in rows if r[0] == "fit")[3] == "—"


# -- the verify stage ------------------------------------------------------------------------


def _verify_context(tmp: Path) -> tuple[Context, dict[str, Any], PlanResult]:
    """A tunnel whose fit and plan are done (a fit of a synthetic ladder, a plan small enough to
    train on the test corpus in seconds); verify is the next stage."""
    spec = tmp / "t.yaml"
    spec.write_text(
        "defaults: [tunnel_schema, {launcher: local}, _self_]\n"
        f"tunnel: {{name: t, dir: '{tmp}/tunnels', verify: {{enabled: true}}}}\n"
    )
    run = [o for o in tiny_overrides(tmp) if not o.startswith(("model=", "run_dir="))]
    tf = load_tunnel(spec, run)
    df = synthetic_points(LAW, [6e3, 2.4e4, 8e4, 1.9e5], (10, 20, 40), noise=0.003)
    fit_file, *_ = analyze(df, target="bpb", budgets=(1e11,), n_boot=20)
    fit_path = tmp / "fit.json"
    fit_path.write_text(json.dumps(fit_file))
    mup = {"scale_emb": 8.0, "dim_model_base": 64}
    plan = make_plan(
        fit_file,
        params=4e4,
        tokens=6e4,
        seq_len=32,
        vocab_size=300,
        batch_tokens=256,
        mup=mup,
        d_head=16,
    )
    state: dict[str, Any] = {"stages": {}}
    results = {
        "fit": FitResult(fit_file=str(fit_path), summary=json_summary(fit_file)),
        "plan": PlanResult(**vars(plan), config="", yaml=""),
        "ladder": LadderResult(noise_sd=0.004, noise_dof=3, dim_model_base=64, d_head=16),
    }
    for k, v in results.items():
        state["stages"][k] = {
            "status": "done",
            "result": json.loads(json.dumps(dataclasses.asdict(v), default=str)),
        }
    return Context(tf, state), fit_file, results["plan"]  # type: ignore[return-value]


def test_verify_trains_the_plan_and_compares_it_with_the_prediction(tmp_path: Path) -> None:
    ctx, fit_file, plan = _verify_context(tmp_path)
    r = verify.STAGE.run(ctx)
    assert r.N == plan.N  # the planned shape is what was trained
    assert round(plan.D / 256) * 256 == r.D  # its tokens, in whole optimizer steps
    pi = fit_file_interval(fit_file, r.N, r.D, level=0.9)
    assert (r.predicted, r.lo, r.hi) == pytest.approx((pi.predicted, pi.lo, pi.hi))
    assert len(r.observed) == 1 and math.isfinite(r.observed[0])
    assert r.inside == (r.lo <= r.observed[0] <= r.hi)
    cfg = json.loads((Path(r.summary.folder) / "runs" / "verify-t0000" / "config.json").read_text())
    assert cfg["model"]["dim_model_base"] == 64 and cfg["model"]["scale_emb"] == 8.0
    assert cfg["train"]["branch_tokens"] == [] and cfg["data"]["seq_len"] == 32
    m = verify.STAGE.metrics(r)
    assert m["verify.inside"] == float(r.inside)
    assert m["verify.rel_error"] == pytest.approx(r.observed[0] / r.predicted - 1)
    line = verify.STAGE.headline(r)
    assert ("inside" if r.inside else "OUTSIDE") in line and "90% interval" in line
    text = " ".join(b for b in verify.STAGE.section(r, "") if isinstance(b, str))
    assert "±0.40%" in text  # the ladder's noise floor next to the error


def test_verify_without_a_plan_says_what_to_run(tmp_path: Path) -> None:
    ctx, *_ = _verify_context(tmp_path)
    del ctx.state["stages"]["plan"]
    with pytest.raises(Exception, match="run the fit and plan stages first"):
        verify.STAGE.run(ctx)


def test_the_plan_uses_the_proxies_base_width() -> None:
    df = synthetic_points(LAW, [6e3, 2.4e4, 8e4], (10, 20, 40))
    fit_file, *_ = analyze(df, target="bpb", budgets=(1e11,), n_boot=0)
    p = make_plan(
        fit_file,
        params=4e4,
        tokens=6e4,
        seq_len=32,
        batch_tokens=256,
        mup={"dim_model_base": 64},
        d_head=16,
        schedule={"kind": "wsd", "decay": "linear", "decay_fraction": 0.1, "warmup_fraction": 0.02},
    )
    assert p.shape.d_head == 16 and abs(p.N / 4e4 - 1) < 0.1  # the proxies' family, near N
    # the proxies' schedule (what the law describes), and the batch's source said truly
    assert p.hydra_config()["schedule"]["decay"] == "linear"
    assert "tokens/step from the caller (--batch-tokens)" in p.to_yaml()
    assert p.hydra_config()["model"]["dim_model_base"] == 64
    assert p.width_multiplier == p.shape.d_model / 64
    assert "dim_model_base: 64\n" in p.to_yaml()  # an int: `+experiment=` composes it


def test_parameter_conventions_are_back_tested_and_the_best_named() -> None:
    """A ladder whose loss follows the law in total parameters (the tied head counted): the
    back-test with total N beats non-embedding N, and the report says so."""
    from windtunnel.scaling.backtest import backtest
    from windtunnel.tunnel.stages.backtest import BacktestResult, _conventions_blocks, conventions

    widths = np.array([16, 32, 48, 64, 96])
    N = np.array([6e3, 2.4e4, 8e4, 1.9e5, 4.4e5])
    rows = []
    for n, d in zip(N, widths, strict=True):
        for m in (20, 40, 80):
            total = n + 1024 * d
            rows.append({"N": n, "D": m * n, "N_head": total, "N_total": total})
    df = pd.DataFrame(rows)
    df["C"] = 6 * df["N"] * df["D"]
    rng = np.random.default_rng(0)
    df["bpb"] = LAW.predict(df["N_total"], df["D"]) * np.exp(0.002 * rng.standard_normal(len(df)))

    def run(frame: pd.DataFrame) -> Any:
        return backtest(frame, target="bpb", mode="rollout", n_boot=10, seed=0)

    got = conventions(df, run(df), run)
    assert [c["convention"] for c in got] == ["non-embedding", "non-embedding + head (= total)"]
    assert got[1]["mean"] < got[0]["mean"] and got[0]["n"] == got[1]["n"] == 9  # 6 + 3
    text = " ".join(
        b
        for b in _conventions_blocks(BacktestResult(max_abs_rel_error=0.0, conventions=got))
        if isinstance(b, str)
    )
    assert "Best back-test: non-embedding + head (= total)" in text
