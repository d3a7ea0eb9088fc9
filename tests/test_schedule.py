"""Schedules are pure; WSD branches share the stable trunk."""

from __future__ import annotations

import itertools

import pytest

from windtunnel.schedule import Schedule, decay_factor, lr_factor


def wsd(total: int, decay: str = "linear", warmup: int = 10) -> Schedule:
    return Schedule(
        kind="wsd",
        total_steps=total,
        warmup_steps=warmup,
        decay_steps=total // 10,
        decay=decay,
        min_lr_ratio=0.01,
    )


def test_warmup_is_linear_then_stable() -> None:
    s = wsd(1000)
    assert [lr_factor(i, s) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, s) == 1.0 and lr_factor(500, s) == 1.0 and lr_factor(899, s) == 1.0


@pytest.mark.parametrize("decay", ["exp", "linear", "cosine", "sqrt"])
def test_decays_fall_monotonically_to_the_floor(decay: str) -> None:
    s = wsd(1000, decay)
    values = [lr_factor(i, s) for i in range(900, 1000)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[0] < 1.0
    assert values[-1] == pytest.approx(0.01, abs=1e-3)


def test_branches_share_the_trunk() -> None:
    short, long = wsd(1000), wsd(4000)
    assert all(lr_factor(i, short) == lr_factor(i, long) for i in range(short.decay_start))


def test_cosine_and_constant() -> None:
    c = Schedule(kind="cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.55)
    assert lr_factor(110, c) == pytest.approx(0.1)
    k = Schedule(kind="constant", total_steps=50, warmup_steps=0)
    assert {lr_factor(i, k) for i in range(50)} == {1.0}


def test_exp_decay_half_life() -> None:
    assert decay_factor(0.15, "exp", 0.0, half_life=0.15) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kw",
    [
        {"kind": "wsd", "decay_steps": 0},
        {"kind": "bogus"},
        {"decay": "wiggly", "kind": "wsd", "decay_steps": 5},
    ],
)
def test_invalid_schedules_raise(kw: dict) -> None:
    with pytest.raises(ValueError):
        Schedule(total_steps=100, warmup_steps=5, **kw)
