"""Learning-rate schedules as pure functions of the optimizer step (DESIGN §3).

All return the *multiplier* of the peak lr at 0-based ``step`` (the lr used for the update that
produces step ``step + 1``). WSD decay branching relies on one property, tested: two WSD
schedules with the same warmup and different totals agree on every step before the earlier
one's decay starts, so one stable trunk serves every branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("exp", "linear", "cosine", "sqrt")
KINDS = ("wsd", "cosine", "constant")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup from 1/W to 1 over ``warmup_steps`` steps, then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def decay_factor(progress: float, shape: str, min_ratio: float, half_life: float = 0.15) -> float:
    """Decay multiplier at ``progress`` ∈ [0, 1] through the decay, ending at ``min_ratio``.

    ``exp``: ``0.5^(progress/half_life)`` floored at ``min_ratio`` (MiniCPM, half-life as a share
    of the decay); ``linear``; ``cosine``; ``sqrt``: ``1 − sqrt(progress)`` scaled to the floor.
    """
    p = min(max(progress, 0.0), 1.0)
    if shape == "exp":
        return max(min_ratio, float(0.5 ** (p / half_life)))
    if shape == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if shape == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "sqrt":
        return 1.0 - (1.0 - min_ratio) * math.sqrt(p)
    raise ValueError(f"unknown decay {shape!r}; choose one of {', '.join(DECAYS)}")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A schedule resolved to steps."""

    kind: str
    total_steps: int
    warmup_steps: int
    decay_steps: int = 0
    decay: str = "linear"
    min_lr_ratio: float = 0.0
    half_life: float = 0.15

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown schedule kind {self.kind!r}; choose one of {', '.join(KINDS)}"
            )
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; choose one of {', '.join(DECAYS)}")
        if self.total_steps <= 0:
            raise ValueError(f"schedule needs total_steps > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]"
            )
        if self.kind == "wsd" and not 0 < self.decay_steps <= self.total_steps - self.warmup_steps:
            raise ValueError(
                f"WSD decay of {self.decay_steps} steps does not fit after {self.warmup_steps} "
                f"warmup steps in {self.total_steps}: lower schedule.decay_fraction or the warmup"
            )

    @property
    def decay_start(self) -> int:
        """First step of the WSD decay (the end of the stable phase)."""
        return self.total_steps - self.decay_steps if self.kind == "wsd" else self.total_steps


def lr_factor(step: int, s: Schedule) -> float:
    """Multiplier of the peak learning rate at ``step``."""
    w = warmup_factor(step, s.warmup_steps)
    if s.kind == "constant" or step < s.warmup_steps:
        return w
    if s.kind == "cosine":
        progress = (step - s.warmup_steps) / max(1, s.total_steps - s.warmup_steps)
        return decay_factor(progress, "cosine", s.min_lr_ratio)
    # WSD: stable until decay_start, then decay so that the last step is at the floor
    if step < s.decay_start:
        return 1.0
    progress = (step - s.decay_start + 1) / s.decay_steps
    return decay_factor(progress, s.decay, s.min_lr_ratio, s.half_life)
