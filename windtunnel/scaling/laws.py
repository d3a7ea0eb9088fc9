"""Functional forms of the laws (pure numpy, no fitting).

Units: every law object stores its coefficients in *raw* units (N in parameters, D in tokens,
C in FLOPs). MiniCPM quotes its coefficients with N and D in billions and C in units of 1e18
FLOPs; :meth:`DataModelLaw.from_minicpm` and :meth:`DataModelLaw.minicpm_coefficients` convert.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

BILLION = 1e9
"""MiniCPM's unit of N and D."""
MINICPM_C_UNIT = 1e18
"""MiniCPM's unit of C (FLOPs)."""

FORMS = ("chinchilla", "minicpm")
"""Names of the data–model law's parametrizations (same law, different units when reported)."""


@dataclass(frozen=True)
class DataModelLaw:
    """``L(N, D) = E + A / N^alpha + B / D^beta`` (Chinchilla approach 3), raw units.

    MiniCPM writes the same law ``C_N·N^-α + C_D·D^-β + L0`` with N, D in billions.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def predict(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        """Loss at N parameters and D tokens."""
        N = np.asarray(N, dtype=float)
        D = np.asarray(D, dtype=float)
        return self.E + self.A * N ** (-self.alpha) + self.B * D ** (-self.beta)

    def log_params(self) -> np.ndarray:
        """The LSE parametrization ``(a, b, e, alpha, beta)`` with ``A = exp(a)`` etc."""
        return np.array(
            [
                math.log(self.A),
                math.log(self.B),
                math.log(max(self.E, 1e-300)),
                self.alpha,
                self.beta,
            ]
        )

    @classmethod
    def from_log_params(cls, theta: np.ndarray) -> DataModelLaw:
        a, b, e, alpha, beta = (float(t) for t in theta)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)

    @classmethod
    def from_minicpm(
        cls,
        *,
        C_N: float,
        C_D: float,
        alpha: float,
        beta: float,
        L0: float,
        unit: float = BILLION,
    ) -> DataModelLaw:
        """MiniCPM's coefficients (N, D in ``unit``, default billions) → raw units."""
        return cls(E=L0, A=C_N * unit**alpha, B=C_D * unit**beta, alpha=alpha, beta=beta)

    def minicpm_coefficients(self, unit: float = BILLION) -> dict[str, float]:
        """``C_N, C_D, alpha, beta, L0`` with N and D in ``unit`` (billions by default)."""
        return {
            "C_N": self.A / unit**self.alpha,
            "C_D": self.B / unit**self.beta,
            "alpha": self.alpha,
            "beta": self.beta,
            "L0": self.E,
        }

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def lse_log_loss(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    """``log L`` in the log-sum-exp parametrization ``LSE(a − α·logN, b − β·logD, e)``."""
    a, b, e, alpha, beta = theta
    z1 = a - alpha * logN
    z2 = b - beta * logD
    z3 = np.full_like(z1, e)
    m = np.maximum(np.maximum(z1, z2), z3)
    out: np.ndarray = m + np.log(np.exp(z1 - m) + np.exp(z2 - m) + np.exp(z3 - m))
    return out


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber function: ``r²/2`` inside ``|r| ≤ δ``, ``δ·(|r| − δ/2)`` outside."""
    ar = np.abs(r)
    out: np.ndarray = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
    return out


@dataclass(frozen=True)
class PowerLaw:
    """``y = k · x^p`` (fitted as a line in log–log space)."""

    k: float
    p: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.k * np.asarray(x, dtype=float) ** self.p

    def inverse(self, y: np.ndarray | float) -> np.ndarray:
        return (np.asarray(y, dtype=float) / self.k) ** (1.0 / self.p)


@dataclass(frozen=True)
class SaturatingPowerLaw:
    """``y = y_inf + k · x^(−gamma)``, e.g. ``L(C) = L∞ + k·C^−γ``."""

    y_inf: float
    k: float
    gamma: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.y_inf + self.k * np.asarray(x, dtype=float) ** (-self.gamma)


def gadre_overtraining(
    N: np.ndarray, M: np.ndarray, a: float, b: float, eta: float, E: float
) -> np.ndarray:
    """Gadre et al. (2024) over-training law, in their code's parametrization.

    ``L(N, M) = E + a·N^η + b·6^(η/2)·(M·N)^η`` with ``M = D/N`` tokens per parameter (η < 0).
    """
    N = np.asarray(N, dtype=float)
    M = np.asarray(M, dtype=float)
    out: np.ndarray = a * N**eta + b * 6.0 ** (eta / 2) * (M * N) ** eta + E
    return out
