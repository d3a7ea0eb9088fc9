"""Typed errors of the scaling-law fitter.

Every user-facing problem with the input or the fit is a :class:`ScalingError`, a ``ValueError``
subclass with a message that says what is wrong and what to do, so the CLI can print it without a
traceback and callers can catch one type.
"""

from __future__ import annotations

from windtunnel.schema import SchemaError


class ScalingError(ValueError):
    """Base class of all scaling-law input and fit errors."""


class InputError(ScalingError):
    """The table lacks a column, or an option names something that does not exist."""


class FitFileError(InputError, SchemaError):
    """A fit file this windtunnel cannot read (a version, a field): the path, the field, what
    to do."""


class TooFewPointsError(ScalingError):
    """Fewer points than the law has free parameters (plus one)."""


class NonFiniteError(ScalingError):
    """NaN or infinite values in a column the fit uses."""


class NonPositiveError(ScalingError):
    """Zero or negative N, D, C or loss (the laws live in log space)."""


class NotIdentifiableError(ScalingError):
    """The design cannot determine a parameter (e.g. all points share one N)."""


class ConvergenceError(ScalingError):
    """The optimizer did not reach a stationary point."""


class PlanRefusedError(ScalingError):
    """The planner refuses a plan outside what any fit supports (e.g. too few optimizer steps);
    the message says why and what to change."""
