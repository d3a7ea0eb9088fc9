"""Sanity checks of a plan against what its fit file supports (pure).

The planner extrapolates laws fitted on small proxies; each check below compares one number of
the plan with the range the fit file records (``data_range``, the batch-size law's
``loss_range``, the bootstrap's intervals) and returns typed :class:`PlanWarning` objects: a code,
what is wrong with the numbers, what to do, and the action taken. What is decided per case, and
why:

* **too few optimizer steps** (``steps``, < :data:`MIN_STEPS`): **refuse**. A run of a few dozen
  steps has no room for warmup, a stable phase and a decay; no law fitted on runs of hundreds of
  steps says anything about it, and no clamp fixes it without changing what was asked (the
  batch, or the budget: the user's choice). ``windtunnel plan`` exits 2; the tunnel records the
  refusal in its report (its other stages stay useful).
* **batch smaller than one sequence** (``batch_clamped``): **clamp** to one sequence and say so
  (a batch cannot be smaller; the law's value would otherwise be lost silently by rounding).
* **compute, N or D far beyond the fit** (``extrapolation``, > :data:`EXTRAPOLATION_WARN`× the
  largest fitted): **warn** with the factors. Extrapolating is the planner's job and there is no
  better number to clamp to; the factor is what tells a team how much to trust it.
* **tokens per parameter outside the ladder's** (``tokens_per_param``, beyond
  :data:`TPP_SLACK`× the fitted range): **warn**. The data term ``B/D^β`` is then extrapolated
  along an axis the ladder did not explore; the allocation is the point of the plan, so no clamp.
* **batch-size law used outside its fitted losses** (``batch_law_range``): **warn** with the
  factor the power law is stretched by. Clamping the loss to the fitted range would give the
  proxies' batch size, which is no better an answer for the full run.
* **tokens-per-parameter or loss interval too wide** (``tokens_per_param_interval``,
  ``loss_interval``): **warn**: the fit does not determine the allocation (or the loss) at this
  budget; the point estimate is not a finding.
* **no ranges in the fit file** (``fit_file_ranges``), **no bootstrap** (``no_interval``) and the
  fit's own warnings (``fit``): **warn**, since the checks above could not be made in full.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Action = Literal["warn", "clamp", "refuse"]

MIN_STEPS = 200
"""Fewer optimizer steps than this: the plan is refused."""
EXTRAPOLATION_WARN = 100.0
"""A plan more than this many times the fit's largest compute (or N, or D) gets a warning."""
TPP_SLACK = 2.0
"""Tokens per parameter more than this factor outside the fitted range get a warning."""
BATCH_LAW_SLACK = 0.05
"""A loss more than this (relative) outside the batch-size law's fitted losses gets a warning."""
TPP_INTERVAL_DECADES = 2.0
"""A tokens-per-parameter interval spanning more decades than this gets a warning."""
LOSS_INTERVAL_REL = 0.1
"""A loss interval whose half-width exceeds this fraction of the loss gets a warning."""


@dataclass(frozen=True)
class PlanWarning:
    """One thing the plan does beyond what the fit supports."""

    code: str
    """Stable identifier (``steps``, ``extrapolation``, ``tokens_per_param``, ...)."""
    message: str
    """What is wrong, in numbers."""
    todo: str
    """What to do about it."""
    action: Action = "warn"
    """``warn`` (plan kept as is), ``clamp`` (a value was changed) or ``refuse`` (no plan)."""

    def line(self) -> str:
        """One line: ``<message>; <todo>`` (the CLI prefixes ``WARNING: ``)."""
        return f"{self.message}; {self.todo}"

    def tagged(self) -> str:
        """``WARNING (code): <line>`` (``CLAMPED``/``REFUSED`` for those actions): the plan's
        YAML header and the tunnel's report."""
        word = {"warn": "WARNING", "clamp": "CLAMPED", "refuse": "REFUSED"}[self.action]
        return f"{word} ({self.code}): {self.line()}"


def _g(x: float) -> str:
    return f"{x:.3g}"


def _range(span: Mapping[str, Any] | None, key: str) -> tuple[float, float] | None:
    if not span or not span.get(key):
        return None
    lo, hi = (float(v) for v in span[key])
    return (lo, hi) if lo > 0 and hi > 0 else None


def check_steps(D: float, batch_size: int, seq_len: int) -> list[PlanWarning]:
    """Refuse a plan with fewer than :data:`MIN_STEPS` optimizer steps."""
    steps = int(D // max(1, batch_size * seq_len))
    if steps >= MIN_STEPS:
        return []
    return [
        PlanWarning(
            "steps",
            f"the plan has {steps} optimizer steps ({_g(D)} tokens at {batch_size} × {seq_len} "
            f"tokens per step); a run needs at least {MIN_STEPS} for warmup, stable phase and "
            "decay",
            "lower the batch (--batch-tokens, or --batch-law K,GAMMA) or raise the budget "
            "(--budget-flops, --tokens)",
            "refuse",
        )
    ]


def check_batch_clamp(batch_tokens: float, seq_len: int) -> list[PlanWarning]:
    """The batch law asked for less than one sequence per step: clamped to one."""
    if batch_tokens >= seq_len / 2:  # rounds to ≥ 1 sequence
        return []
    return [
        PlanWarning(
            "batch_clamped",
            f"the batch-size law gives {_g(batch_tokens)} tokens per step, less than one "
            f"sequence of {seq_len}: clamped to 1 sequence",
            "check the batch-size law (its loss units must match the fit's target) or set "
            "--batch-tokens",
            "clamp",
        )
    ]


def check_extrapolation(
    N: float, D: float, span: Mapping[str, Any] | None, *, limit: float = EXTRAPOLATION_WARN
) -> list[PlanWarning]:
    """One warning when compute 6ND, N or D is more than ``limit``× the largest fitted."""
    parts = []
    top_c = None
    for key, value, what in (("C", 6.0 * N * D, "compute 6ND"), ("N", N, "N"), ("D", D, "D")):
        r = _range(span, key)
        if r is None:
            continue
        if key == "C":
            top_c = r[1]
        if value / r[1] > limit:
            parts.append(
                f"{what} = {_g(value)} is {value / r[1]:.2g}x the largest fitted ({_g(r[1])})"
            )
    if not parts:
        return []
    span_c = _range(span, "C")
    where = (
        f"; the law was fitted over compute {_g(span_c[0])}-{_g(top_c)} FLOPs"
        if span_c and top_c
        else ""
    )
    return [
        PlanWarning(
            "extrapolation",
            f"{', '.join(parts)}{where}: a law is rarely trusted beyond ~{limit:g}x its fitted "
            "range, so this plan is an extrapolation, not a finding",
            "fit a ladder closer to this budget (larger proxies, more tokens) before spending it, "
            "or plan a smaller budget",
        )
    ]


def check_tokens_per_param(
    N: float, D: float, span: Mapping[str, Any] | None, *, slack: float = TPP_SLACK
) -> list[PlanWarning]:
    """Tokens per parameter more than ``slack``× outside the fitted range."""
    r = _range(span, "tokens_per_param")
    if r is None:
        return []
    tpp = D / N
    lo, hi = r
    if lo / slack <= tpp <= hi * slack:
        return []
    return [
        PlanWarning(
            "tokens_per_param",
            f"the plan trains {_g(tpp)} tokens per parameter; the ladder's points span "
            f"{_g(lo)}-{_g(hi)}, so the data term B/D^beta is extrapolated "
            f"{max(tpp / hi, lo / tpp):.2g}x beyond them",
            "add decay branches (or sizes) at tokens per parameter nearer this one, or fix the "
            "ratio yourself with --params and --tokens",
        )
    ]


def check_batch_law(
    loss: float, law: Mapping[str, Any], *, slack: float = BATCH_LAW_SLACK
) -> list[PlanWarning]:
    """The batch-size law evaluated at a loss outside the losses it was fitted at."""
    r = _range(law, "loss_range")
    if r is None:
        return []
    lo, hi = r
    if lo * (1 - slack) <= loss <= hi * (1 + slack):
        return []
    edge = lo if loss < lo else hi
    stretch = (edge / loss) ** float(law["gamma"])
    return [
        PlanWarning(
            "batch_law_range",
            f"the batch-size law was fitted at losses {_g(lo)}-{_g(hi)} and is used at the "
            f"predicted {_g(loss)}: its batch is {stretch:.2g}x the one at the nearest fitted "
            "loss",
            "fit the batch-size law on runs that reach losses nearer the plan's (larger proxies "
            "or longer runs), or set the batch with --batch-tokens",
        )
    ]


def check_intervals(
    loss: float,
    loss_interval: Sequence[float] | None,
    tpp_interval: Sequence[float] | None,
    *,
    decades: float = TPP_INTERVAL_DECADES,
    rel: float = LOSS_INTERVAL_REL,
) -> list[PlanWarning]:
    """Intervals too wide to read the plan's numbers as findings."""
    out = []
    if tpp_interval is not None:
        lo, hi = (float(v) for v in tpp_interval)
        bounded = lo > 0 and math.isfinite(lo) and math.isfinite(hi)
        span = math.log10(hi / lo) if bounded else math.inf
        if span > decades:
            out.append(
                PlanWarning(
                    "tokens_per_param_interval",
                    f"the interval of tokens per parameter at this budget is [{_g(lo)}, {_g(hi)}]"
                    f" ({'unbounded' if math.isinf(span) else f'{span:.1f} decades'}): the fit "
                    "does not determine the allocation here",
                    "add sizes and token counts to the ladder (a wider N and D range) or plan "
                    "nearer the fitted compute",
                )
            )
    if loss_interval is not None and loss > 0:
        lo, hi = (float(v) for v in loss_interval)
        half = (hi - lo) / 2 if math.isfinite(lo) and math.isfinite(hi) else math.inf
        if half > rel * loss:
            width = "unbounded" if math.isinf(half) else f"±{half / loss:.0%}"
            out.append(
                PlanWarning(
                    "loss_interval",
                    f"the predicted loss {_g(loss)} has the interval [{_g(lo)}, {_g(hi)}], {width}",
                    "read the prediction as a range; more points (sizes, seeds) narrow it",
                )
            )
    return out


def check_fit_file(fit: Mapping[str, Any]) -> list[PlanWarning]:
    """What the fit file lacks for the checks above, and the fit's own warnings."""
    out = []
    span = fit.get("data_range") or {}
    missing = [k for k in ("C", "N", "D", "tokens_per_param") if not span.get(k)]
    law = fit.get("batch_size_law")
    if law and not law.get("loss_range"):
        missing.append("the batch-size law's losses")
    if missing:
        out.append(
            PlanWarning(
                "fit_file_ranges",
                f"the fit file (version {fit.get('version', 1)}) records no fitted range of "
                f"{', '.join(missing)}: the plan cannot be checked against it",
                "rerun `windtunnel fit --out DIR` to write a current fit file",
            )
        )
    if not fit.get("bootstrap"):
        out.append(
            PlanWarning(
                "no_interval",
                "the fit file has no bootstrap: the predicted loss and the allocation have no "
                "interval",
                "rerun `windtunnel fit --bootstrap 200`",
            )
        )
    for w in (fit.get("fit") or {}).get("warnings") or []:
        out.append(
            PlanWarning(
                "fit",
                f"the fit warned: {w}",
                "treat the extrapolated loss as uncertain; a wider N and D range in the ladder "
                "identifies the parameters",
            )
        )
    return out


def refusals(warnings: Sequence[PlanWarning]) -> list[PlanWarning]:
    return [w for w in warnings if w.action == "refuse"]
