"""Compute-optimal allocation from a fitted data–model law (pure).

Minimizing ``L = E + A·N^−α + B·D^−β`` under ``C = k·N·D`` (k = 6 by default) gives

``N_opt = G·(C/k)^a``, ``D_opt = G^−1·(C/k)^b``, ``G = (α·A / (β·B))^(1/(α+β))``,
``a = β/(α+β)``, ``b = α/(α+β)``,

and MiniCPM's closed form ``N_opt/D_opt = K²·(C/6)^η`` with ``K = (α·C_N/(β·C_D))^(1/(α+β))``
(= G in the units the coefficients are quoted in) and ``η = (β−α)/(α+β)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from windtunnel.scaling.laws import BILLION, MINICPM_C_UNIT, DataModelLaw

FLOPS_PER_PARAM_TOKEN = 6.0
"""``C = 6·N·D`` (forward + backward). Pass the measured FLOPs/token/param to be exact."""


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal point at one budget."""

    C: float
    """Training FLOPs."""
    N_opt: float
    D_opt: float
    tokens_per_param: float
    """``D_opt / N_opt``."""
    loss: float
    """Predicted loss at (N_opt, D_opt)."""
    a: float
    """``N_opt ∝ C^a``."""
    b: float
    """``D_opt ∝ C^b``."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def allocation_exponents(law: DataModelLaw) -> tuple[float, float]:
    """``(a, b) = (β/(α+β), α/(α+β))``."""
    s = law.alpha + law.beta
    return law.beta / s, law.alpha / s


def _G(law: DataModelLaw) -> float:
    return float((law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta)))


def compute_optimal(
    law: DataModelLaw, C: float, *, flops_per_param_token: float = FLOPS_PER_PARAM_TOKEN
) -> Allocation:
    """N_opt, D_opt, tokens per parameter and predicted loss at budget ``C`` FLOPs."""
    if not C > 0:
        raise ValueError(f"compute budget must be positive, got {C}")
    a, b = allocation_exponents(law)
    G = _G(law)
    x = C / flops_per_param_token
    N = G * x**a
    D = x / N
    return Allocation(
        C=float(C),
        N_opt=float(N),
        D_opt=float(D),
        tokens_per_param=float(D / N),
        loss=float(law.predict(N, D)),
        a=a,
        b=b,
    )


def optimal_for_params(
    law: DataModelLaw, N: float, *, flops_per_param_token: float = FLOPS_PER_PARAM_TOKEN
) -> Allocation:
    """The budget (and D) at which a model of ``N`` parameters is compute-optimal."""
    a, _ = allocation_exponents(law)
    x = (N / _G(law)) ** (1.0 / a)
    return compute_optimal(
        law, x * flops_per_param_token, flops_per_param_token=flops_per_param_token
    )


def optimal_for_tokens(
    law: DataModelLaw, D: float, *, flops_per_param_token: float = FLOPS_PER_PARAM_TOKEN
) -> Allocation:
    """The budget (and N) at which training on ``D`` tokens is compute-optimal."""
    _, b = allocation_exponents(law)
    x = (D * _G(law)) ** (1.0 / b)
    return compute_optimal(
        law, x * flops_per_param_token, flops_per_param_token=flops_per_param_token
    )


def minicpm_closed_form(
    law: DataModelLaw,
    C: float | None = None,
    *,
    unit: float = BILLION,
    c_unit: float = MINICPM_C_UNIT,
) -> dict[str, float]:
    """MiniCPM's ``K``, ``K²``, ``η`` (N, D in ``unit``, C in ``c_unit``) and, given ``C`` in
    FLOPs, ``N_opt/D_opt = K²·(C/6)^η`` and its inverse ``D/N``."""
    co = law.minicpm_coefficients(unit)
    s = co["alpha"] + co["beta"]
    K = (co["alpha"] * co["C_N"] / (co["beta"] * co["C_D"])) ** (1.0 / s)
    eta = (co["beta"] - co["alpha"]) / s
    out = {"K": K, "K2": K * K, "eta": eta}
    if C is not None:
        # C = 6·N·D in FLOPs ⇔ C/c_unit = 6·N_u·D_u·unit²/c_unit; MiniCPM's units make the factor 1.
        x = C / (6.0 * unit * unit)  # = N_u · D_u
        ratio = K * K * x**eta
        out["N_over_D"] = float(ratio)
        out["D_over_N"] = float(1.0 / ratio)
        out["C_units"] = C / c_unit
    return out


def tokens_per_param_curve(law: DataModelLaw, C: np.ndarray) -> np.ndarray:
    """``D_opt/N_opt`` over an array of budgets."""
    a, b = allocation_exponents(law)
    x = np.asarray(C, dtype=float) / FLOPS_PER_PARAM_TOKEN
    return x ** (b - a) / _G(law) ** 2
