"""Planner: MiniCPM shape rules, Hydra YAML round trip through the trainer's schema."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from windtunnel.config import to_run_config
from windtunnel.flops import Shape, non_embedding_params
from windtunnel.scaling import DataModelLaw, InputError
from windtunnel.scaling.plan import GPU_PEAK_BF16, choose_shape, make_plan

MINICPM = DataModelLaw.from_minicpm(C_N=7.15e-2, C_D=3.00e-1, alpha=0.29, beta=0.23, L0=0.31)


# bs = K / L^6.24 ≈ 4M tokens at the loss MINICPM predicts for a 1e21 run (MiniCPM's own law is
# for their loss scale: at this law's ≈0.43 it asks for 2.5e11 tokens per step, and is refused)
BATCH_LAW = {"k": 2.7e4, "gamma": 6.24}


def _fit_file(law=MINICPM, target="loss", boot=True, batch=True):
    f = {"kind": "windtunnel.scaling.fit", "version": 1, "fit": {**law.to_dict(), "target": target}}
    if batch:
        f["batch_size_law"] = BATCH_LAW
    if boot:
        rng = np.random.default_rng(0)
        s = np.array([law.E, law.A, law.B, law.alpha, law.beta]) * (
            1 + 0.01 * rng.standard_normal((50, 5))
        )
        f["bootstrap"] = {
            "samples": s.tolist(),
            "seed": 0,
            "n_boot": 50,
            "n_failed": 0,
            "level": 0.95,
        }
    return f


@pytest.mark.parametrize(
    ("N", "label", "d", "L", "kv"),
    [
        (9.4e6, "minicpm-9M", 320, 8, 5),
        (1.25e9, "minicpm-1.2B", 1536, 52, 8),
        (2.44e9, "minicpm-2.4B", 2304, 40, 36),
    ],
)
def test_family_members_are_reproduced(N, label, d, L, kv):
    name, s = choose_shape(N)
    assert (name, s.d_model, s.n_layers, s.n_kv_heads) == (label, d, L, kv)
    assert s.d_head == 64 and s.d_ff == int(2.5 * d)


@pytest.mark.parametrize("N", [1e6, 3e8, 5e9, 7e10])
def test_interpolated_shapes_hit_the_target(N):
    _, s = choose_shape(N)
    assert non_embedding_params(s) == pytest.approx(N, rel=0.05)
    assert s.d_model % 64 == 0 and s.n_heads == s.d_model // 64


def test_plan_budget_round_trips_through_the_trainer_schema(tmp_path):
    plan = make_plan(_fit_file(), budget_flops=1e21, gpu="h100", mfu=0.4)
    # D/N from MiniCPM's coefficients at 1e21 (the shape's N is within a few % of N_opt)
    assert plan.tokens_per_param == pytest.approx(184, rel=0.1)
    text = plan.to_yaml()
    assert text.startswith("# @package _global_\n")
    path = tmp_path / "full.yaml"
    path.write_text(text)
    cfg = to_run_config(yaml.safe_load(path.read_text()))
    m = cfg.model
    shape = Shape(
        n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads or m.n_heads, d_head=m.d_head, d_ff=m.d_ff,
        vocab_size=m.vocab_size,
    )  # fmt: skip
    assert shape == plan.shape
    assert non_embedding_params(shape) == pytest.approx(plan.N_target, rel=0.1)
    assert cfg.train.tokens == plan.D
    assert cfg.optim.batch_size * cfg.data.seq_len == pytest.approx(plan.batch_tokens, rel=0.01)
    assert cfg.schedule.kind == "wsd" and cfg.schedule.decay_fraction == pytest.approx(0.1)
    assert cfg.optim.lr == pytest.approx(0.01) and m.dim_model_base == 256 and m.mup
    lo, hi = plan.loss_interval
    assert lo < plan.loss < hi
    assert plan.gpu_hours == pytest.approx(plan.C_exact / (GPU_PEAK_BF16["h100"] * 0.4) / 3600)


def test_plan_by_params_and_tokens():
    p = make_plan(_fit_file(boot=False), params=2.44e9)
    assert p.shape.d_model == 2304 and p.loss_interval is None
    p2 = make_plan(_fit_file(boot=False), tokens=1e12)
    assert int(1e12) == p2.D
    p3 = make_plan(
        _fit_file(boot=False), params=2.44e9, tokens=1e12, batch_law={"k": 1e4, "gamma": 6}
    )
    assert int(1e12) == p3.D and p3.batch_tokens == pytest.approx(1e4 / p3.loss**6)


def test_plan_errors():
    with pytest.raises(InputError, match="one of"):
        make_plan(_fit_file(), budget_flops=1e21, params=1e9)
    with pytest.raises(InputError, match="unknown GPU"):
        make_plan(_fit_file(), budget_flops=1e21, gpu="tpu9")
    with pytest.raises(InputError, match="MFU"):
        make_plan(_fit_file(), budget_flops=1e21, mfu=1.5)


def test_bpb_fit_without_batch_law_is_flagged():
    p = make_plan(_fit_file(target="bpb", batch=False), budget_flops=1e21, refuse=False)
    assert any("bpb" in n for n in p.notes)
    assert p.refused and p.steps < 200  # MiniCPM's law at this law's loss scale: 1 step


def test_plan_far_beyond_the_fitted_points_warns():
    """A law fitted on micro models and spent on a 1e21 budget is a guess: the plan says so."""
    fit = _fit_file()
    fit["data_range"] = {"N": [6e3, 8e4], "D": [1e5, 3e6], "C": [4e9, 1.4e12]}
    plan = make_plan(fit, budget_flops=1e21)
    (w,) = [w for w in plan.warnings if w.code == "extrapolation"]
    assert "compute 6ND" in w.message and "7.1e+08x" in w.message and w.action == "warn"
    assert "# WARNING (extrapolation): compute 6ND" in plan.to_yaml()
    fit["data_range"] = {"N": [1e8, 2e9], "D": [2e10, 5e11], "C": [1.2e19, 6e21]}
    assert not [w for w in make_plan(fit, budget_flops=1e21).warnings if w.code == "extrapolation"]


def test_the_plans_loss_interval_holds_the_fits_lack_of_fit_and_seed_noise():
    """A run lands off the law by the fit's own scatter: the plan's interval says so."""
    quiet = _fit_file()
    noisy = {**_fit_file(), "noise": {"residuals": [0.05, -0.05] * 10, "seed_sd": 0.02}}
    kw = {"budget_flops": 1e21, "gpu": "h100", "mfu": 0.4}
    a, b = make_plan(quiet, **kw), make_plan(noisy, **kw)
    assert a.loss == b.loss
    assert b.loss_interval[0] < b.loss < b.loss_interval[1]
    width_a = a.loss_interval[1] - a.loss_interval[0]
    width_b = b.loss_interval[1] - b.loss_interval[0]
    # ±5% scatter in log loss (inflated for the 5 fitted parameters) at 95%: about ±10%
    assert width_b > 2 * width_a and 0.15 < width_b / b.loss < 0.3
