"""Every use of a private API of Optuna, Ray or submitit, each behind one small function.

These are the places an upgrade of those libraries can break windtunnel silently, so they live
together, and ``tests/test_compat.py`` exercises each one against the installed version (the
versions they were checked with are in :data:`CHECKED`). When a test there fails after an
upgrade, fix the function here; nothing else reaches into those libraries' internals.
"""

from __future__ import annotations

import threading
import time
from typing import Any

CHECKED = {"optuna": "5.", "ray": "2.", "submitit": "1.5."}
"""Major(.minor) versions these adapters were written and tested against."""


# -- Optuna -----------------------------------------------------------------------------------
def trial_id(trial: Any) -> int:
    """The storage id of an ``optuna.Trial`` or ``FrozenTrial`` (what ``tell`` and
    ``optuna.Trial(study, id)`` take); Optuna has no public accessor for it."""
    return int(trial._trial_id)


# -- Ray Tune ---------------------------------------------------------------------------------
def finish_function_trial(timeout_s: float) -> None:
    """In a Ray Tune function-trainable's actor: make the trial's thread leave its next
    ``tune.report`` (it raises ``SystemExit`` there) and wait up to ``timeout_s`` for the thread
    to end. Tune's own stop does not wait for the training thread, which would leave the
    trainer's checkpoint half-written; no public API does this."""
    from ray.train._internal.session import get_session

    session = get_session()
    thread = getattr(session, "training_thread", None)
    if session is None or not session.training_started or thread is None:
        return
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        session.stop_event.set()  # the thread's next report() exits
        session.continue_lock.release()
        threading.Thread.join(thread, timeout=1.0)


# -- submitit ---------------------------------------------------------------------------------
def sbatch_script(
    parameters: dict[str, Any], folder: Any, command: str, map_count: int | None
) -> str:
    """The sbatch script submitit would write for ``parameters`` (a pure function there, but
    private): windtunnel pins it in a golden file and packs trials with it."""
    from submitit.slurm.slurm import _make_sbatch_string

    return str(
        _make_sbatch_string(command=command, folder=folder, map_count=map_count, **parameters)
    )


def submitit_command(executor: Any) -> str:
    """The command a submitit executor runs in each task (``python -u -m submitit...``)."""
    return str(executor._submitit_command_str)
