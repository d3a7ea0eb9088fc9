"""Every config in conf/ composes into typed dataclasses; bad input says what is wrong."""

from __future__ import annotations

import pytest
from conftest import REPO

from windtunnel.compose import compose_run as compose
from windtunnel.compose import config_groups
from windtunnel.config import RunConfig, resolve, to_run_config

GROUPS = config_groups()


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g, opts in GROUPS.items() for o in opts], ids=str
)
def test_every_config_composes_and_resolves(override: str) -> None:
    if override.startswith("launcher="):  # launchers belong to sweep specs, not to a run
        from windtunnel.sweep import load_sweep

        spec = load_sweep(REPO / "sweeps" / "smoke.yaml", [override])
        assert spec.launcher.name == override.split("=")[1]
        return
    cfg = compose([override])
    assert isinstance(cfg, RunConfig)
    res = resolve(cfg, vocab_size=1024)
    assert res.non_embedding_params > 0 and res.total_steps > 0


def test_all_groups_present() -> None:
    assert {"model", "data", "optim", "schedule", "train", "tracker", "experiment"} <= set(GROUPS)
    assert (REPO / "conf" / "experiment" / "smoke.yaml").exists()


def test_model_family_shapes_follow_the_rules() -> None:
    for name in GROUPS["model"]:
        m = resolve(compose([f"model={name}"]), vocab_size=1024).cfg.model
        if name.startswith("micro") or name in {"minicpm_9m", "minicpm_0p1b", "minicpm_0p5b"}:
            assert m.d_ff == round(2.5 * m.d_model), name
            assert m.n_heads * m.d_head == m.d_model, name


def test_micro_family_spans_20k_to_3m_params() -> None:
    sizes = [
        resolve(compose([f"model={n}"]), 1024).non_embedding_params
        for n in GROUPS["model"]
        if n.startswith("micro")
    ]
    assert min(sizes) < 30_000 and 2_000_000 < max(sizes) < 3_500_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=nope"], "model"),
        (["optim.lr=abc"], "lr"),
        (["optim.nonsense=1"], "nonsense"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["schedule.decay=wiggly"], "schedule.decay"),
        (["optim.batch_size=30", "optim.grad_accum=4"], "multiple of optim.grad_accum"),
        (["data.seq_len=5000"], "max_seq_len"),
        (["model.n_heads=3", "model.n_kv_heads=2"], "n_kv_heads"),
    ],
)
def test_bad_config_is_a_clear_value_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(compose(overrides), vocab_size=1024)


def test_unknown_key_in_dict_config_lists_valid_keys() -> None:
    with pytest.raises(ValueError, match="valid keys of optim"):
        to_run_config({"optim": {"lrr": 1.0}})
