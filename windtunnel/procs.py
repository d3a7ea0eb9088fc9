"""Stopping processes: SIGTERM, a grace period, then SIGKILL (the one copy of that dance).

A target is a ``subprocess.Popen`` (or anything with ``pid`` and ``wait(timeout)`` raising
``subprocess.TimeoutExpired``, such as a prewarmed worker), waited on directly, or a bare pid
(a process this one did not start), polled until it is gone or a zombie. ``group=True``
signals the target's whole process group (the target leads it: ``start_new_session=True``)
and, once the leader has ended, SIGKILLs the group so that nothing it started is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

POLL_S = 0.05


def send_signal(target: Any, sig: int, *, group: bool = False) -> None:
    """Send ``sig`` to ``target`` (a process handle or a pid), or to its process group; a process
    already gone is not an error."""
    pid = target if isinstance(target, int) else target.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        elif not isinstance(target, int) and hasattr(target, "send_signal"):
            target.send_signal(sig)  # Popen: never signals a pid it has already reaped
        else:
            os.kill(pid, sig)


def is_dead(pid: int) -> bool:
    """Whether ``pid`` has ended (gone, or a zombie nobody has reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    return False


def _wait(target: Any, deadline: float) -> bool:
    """Wait until ``target`` has ended or ``deadline`` (monotonic) passed; True if it ended."""
    if isinstance(target, int):
        while not is_dead(target):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True
    try:
        target.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def terminate_all(
    targets: Iterable[Any], *, group: bool = False, grace_s: float = 3.0, kill_wait_s: float = 5.0
) -> bool:
    """SIGTERM every target, wait up to ``grace_s`` in all, SIGKILL those still running and wait
    up to ``kill_wait_s`` for them. Returns whether every target has ended."""
    targets = list(targets)
    for t in targets:
        send_signal(t, signal.SIGTERM, group=group)
    deadline = time.monotonic() + grace_s
    alive = [t for t in targets if not _wait(t, deadline)]
    for t in targets if group else alive:  # a group: its leader's children too
        send_signal(t, signal.SIGKILL, group=group)
    deadline = time.monotonic() + kill_wait_s
    return all([_wait(t, deadline) for t in alive])


def terminate(
    target: Any, *, group: bool = False, grace_s: float = 3.0, kill_wait_s: float = 5.0
) -> bool:
    """SIGTERM ``target``, SIGKILL it after ``grace_s``; see :func:`terminate_all`."""
    return terminate_all([target], group=group, grace_s=grace_s, kill_wait_s=kill_wait_s)
