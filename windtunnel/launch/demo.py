"""Tiny trial functions for smoke tests of the launchers (importable on every worker).

`resumable_count` is the reference resumable trial: it keeps its state in its own checkpoint
directory, so a preempted and requeued call resumes and returns what an uninterrupted one returns.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from windtunnel.files import atomic_write


def add(a: float, b: float = 0) -> float:
    return a + b


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def pid_then_sleep(pid_file: str, seconds: float) -> int:
    """Write this process's pid to ``pid_file`` then sleep (tests kill it)."""
    atomic_write(pid_file, str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def env_value(name: str) -> str | None:
    return os.environ.get(name)


def process_facts() -> dict:
    """What a worker process looks like from inside: is torch already imported (a prewarmed
    worker), does the process lead its own process group (so cancel kills all it started)."""
    import sys

    return {"torch_imported": "torch" in sys.modules, "own_group": os.getpgid(0) == os.getpid()}


def resumable_count(
    ckpt_dir: str, steps: int, step_s: float = 0.1, started_file: str | None = None
) -> dict:
    """Count to ``steps`` (one step per ``step_s`` seconds), checkpointing after every step.

    Returns the sum of the steps' values, how many times the call started and at which step each
    start began, so a test can see that a preempted run resumed from its checkpoint (a start at a
    step > 0) with the same total as an uninterrupted one.
    """
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    state_path = d / "state.json"
    state = {"step": 0, "total": 0, "starts": 0, "pids": [], "start_steps": []}
    if state_path.exists():
        state = json.loads(state_path.read_text())
    state["starts"] += 1
    state["pids"].append(os.getpid())
    state["start_steps"].append(state["step"])
    _save(state_path, state)
    if started_file:
        Path(started_file).write_text(json.dumps(state))
    while state["step"] < steps:
        time.sleep(step_s)
        state["step"] += 1
        state["total"] += state["step"] ** 2
        _save(state_path, state)
    return {
        "total": state["total"],
        "steps": state["step"],
        "starts": state["starts"],
        "start_steps": state["start_steps"],
    }


def _save(path: Path, state: dict) -> None:
    atomic_write(path, json.dumps(state))
