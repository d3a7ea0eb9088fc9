"""The stages of a tunnel, one module each, in the order they run (:data:`STAGES`).

Sweeps that train (μP search → μTransfer check → batch-size law → WSD ladder), then pure steps
that read what they left (fit → plan → back-test), then the forward check that trains the plan
(verify). Each module holds its
:class:`~windtunnel.tunnel.stage.Stage`, its result dataclass and its helpers; adding a stage is
adding a module and its entry here (and its settings as ``tunnel.<name>`` in the spec).
"""

from __future__ import annotations

from typing import Any

from windtunnel.tunnel.stage import Stage
from windtunnel.tunnel.stages import (
    backtest,
    batch_size,
    fit,
    ladder,
    lr_transfer,
    mup_search,
    plan,
    verify,
)

STAGES: tuple[Stage[Any], ...] = (
    mup_search.STAGE,
    lr_transfer.STAGE,
    batch_size.STAGE,
    ladder.STAGE,
    fit.STAGE,
    plan.STAGE,
    backtest.STAGE,
    verify.STAGE,
)
"""Every stage, in the order a tunnel runs them."""

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

assert len(set(NAMES)) == len(NAMES), NAMES


def get(name: str) -> Stage[Any]:
    """The stage called ``name`` (``KeyError`` if there is none)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)
