"""Preemption: requeue a resumable trial call on SIGUSR2 (SLURM preemption or time limit).

The trial contract: ``fn(*args, **kwargs)`` resumes from its own checkpoint directory (named in its
arguments) and returns the same result whether or not it was interrupted. :class:`Requeueable`
wraps such a call for submitit: on SIGUSR2 submitit calls :meth:`Requeueable.checkpoint`, which
returns the same call as a ``DelayedSubmission``; submitit pickles it, requeues the job
(``scontrol requeue``) and exits; the requeued job calls ``fn`` again and it resumes.

A trial can also save at the moment of preemption: :func:`on_preempt` registers a callback that
runs when the signal arrives (inside the signal handler, so it must only write the last consistent
state, not wait on the training step in progress).

A trial that can stop cleanly registers a *stopper* with :func:`stop_on_preempt` (the trainer
does: it calls ``engine.stop.request``). While one is registered, SIGUSR2 does not end the process
at an arbitrary bytecode (submitit's handler exits from inside the signal handler, which could tear
a metric log from its bookkeeping and duplicate the point on resume): the stopper is called, the
call checkpoints at its next safe point and returns, and only then is the job requeued. If it has
not returned within ``STOP_GRACE_S`` the job is requeued at once, as without a stopper.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

log = logging.getLogger(__name__)

_callbacks: list[Callable[[], Any]] = []
_stoppers: list[Callable[[], Any]] = []
_preempted = False
STOP_GRACE_S = 10.0
"""Seconds a stopped call has to return before the job is requeued regardless."""


@contextmanager
def stop_on_preempt(stopper: Callable[[], Any]) -> Iterator[None]:
    """While inside, a preemption calls ``stopper()`` (in the signal handler: it must only set a
    flag) and the job is requeued once the wrapped call has returned."""
    _stoppers.append(stopper)
    try:
        yield
    finally:
        if stopper in _stoppers:
            _stoppers.remove(stopper)


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
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        if not callable(requeue) or threading.current_thread() is not threading.main_thread():
            return self.fn(*args, **kwargs)
        pending: list[int] = []

        def deferred(signum: int, frame: Any) -> None:
            if not _stoppers or pending:  # nothing can stop cleanly (or a second signal)
                requeue(signum, frame)
                return
            pending.append(signum)
            log.warning("preempted: stopping at the next safe point, then requeueing")
            for stop in list(_stoppers):
                stop()
            signal.signal(signal.SIGALRM, too_slow)
            signal.setitimer(signal.ITIMER_REAL, STOP_GRACE_S)

        def too_slow(*_: Any) -> None:  # no safe point in time: requeue now (exits)
            signum = pending.pop()
            requeue(signum, None)

        old_alarm = signal.getsignal(signal.SIGALRM)
        signal.signal(signal.SIGUSR2, deferred)
        try:
            return self.fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_alarm)
            signal.signal(signal.SIGUSR2, requeue)
            if pending:  # stopped cleanly: now checkpoint the call and requeue (exits)
                requeue(pending[0], None)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        run_preempt_callbacks()
        # a callable that knows how to checkpoint itself decides what is requeued
        hook = getattr(self.fn, "checkpoint", None)
        if callable(hook):
            return hook(*args, **kwargs)
        return DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Requeueable({getattr(self.fn, '__qualname__', self.fn)!r})"
