"""Preemption: requeue a resumable trial call on SIGUSR2 (SLURM preemption or time limit).

The trial contract: ``fn(*args, **kwargs)`` resumes from its own checkpoint directory (named in its
arguments) and returns the same result whether or not it was interrupted. :class:`Requeueable`
wraps such a call for submitit: on SIGUSR2 submitit calls :meth:`Requeueable.checkpoint`, which
returns the same call as a ``DelayedSubmission``; submitit pickles it, requeues the job
(``scontrol requeue``) and exits; the requeued job calls ``fn`` again and it resumes.

A trial can also save at the moment of preemption: :func:`on_preempt` registers a callback that
runs when the signal arrives (inside the signal handler, so it must only write the last consistent
state, not wait on the training step in progress).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

log = logging.getLogger(__name__)

_callbacks: list[Callable[[], Any]] = []
_preempted = False


def on_preempt(callback: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``callback()`` when this process is preempted (usable as a decorator)."""
    _callbacks.append(callback)
    return callback


def clear_preempt_callbacks() -> None:
    _callbacks.clear()


def preempted() -> bool:
    """Whether a preemption signal has reached this process."""
    return _preempted


def run_preempt_callbacks() -> None:
    """Mark the process preempted and run the callbacks once each (errors are logged)."""
    global _preempted
    _preempted = True
    while _callbacks:
        cb = _callbacks.pop(0)
        try:
            cb()
        except Exception:  # a failing callback must not stop the requeue
            log.exception("preemption callback %r failed", cb)
    sys.stdout.flush()
    sys.stderr.flush()


class Requeueable(Checkpointable):
    """Wrap a resumable call so that submitit requeues it on preemption or time limit.

    ``Requeueable(fn)(*args, **kwargs)`` is ``fn(*args, **kwargs)``; on SIGUSR2 submitit calls
    ``checkpoint(*args, **kwargs)``, which runs the :func:`on_preempt` callbacks and returns the
    same call to be run again after the requeue.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        run_preempt_callbacks()
        # a callable that knows how to checkpoint itself decides what is requeued
        hook = getattr(self.fn, "checkpoint", None)
        if callable(hook):
            return hook(*args, **kwargs)
        return DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Requeueable({getattr(self.fn, '__qualname__', self.fn)!r})"
