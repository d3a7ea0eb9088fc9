"""The inline launcher: runs each call in this process at submit time (tests, debugging)."""

from __future__ import annotations

import itertools

from windtunnel.launch.base import (
    COMPLETED,
    FAILED,
    Call,
    JobHandle,
    Launcher,
)
from windtunnel.launch.options import InlineOptions
from windtunnel.launch.outcome import Outcome

_ids = itertools.count()


class InlineJob(JobHandle):
    def __init__(self, job_id: str, outcome: Outcome) -> None:
        self.job_id = job_id
        self._outcome = outcome

    @property
    def state(self) -> str:
        return COMPLETED if self._outcome.ok else FAILED

    def done(self) -> bool:
        return True

    def _wait_outcome(self, timeout: float | None) -> Outcome:
        return self._outcome

    def cancel(self) -> None:
        """Nothing to cancel: the call ran at submit."""


class InlineLauncher(Launcher):
    """Runs the call synchronously inside `submit`; packed trials run one after the other."""

    name = "inline"
    Options = InlineOptions

    def _submit_calls(self, calls: list[Call]) -> list[JobHandle]:
        return [
            InlineJob(f"inline-{next(_ids)}", Outcome.capture(fn, args, kwargs))
            for fn, args, kwargs in calls
        ]

    def map_array(self, fn, list_of_args):  # type: ignore[override]
        """Trials run one after the other in this process whatever ``trials_per_job`` says."""
        calls: list[Call] = [(fn, a if isinstance(a, tuple) else (a,), {}) for a in list_of_args]
        return self._submit_calls(calls)
