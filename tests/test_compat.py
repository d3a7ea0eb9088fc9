"""The private APIs windtunnel uses (windtunnel/compat.py), each exercised on the installed
version: when an upgrade of Optuna, Ray or submitit breaks one, this file says which."""

from __future__ import annotations

import importlib.metadata
import inspect
import threading

import pytest

from windtunnel import compat


@pytest.mark.parametrize("package", sorted(compat.CHECKED))
def test_installed_versions_are_the_checked_ones(package: str) -> None:
    version = importlib.metadata.version(package)
    assert version.startswith(compat.CHECKED[package]), (
        f"{package} {version} is not the version compat.py was checked with "
        f"({compat.CHECKED[package]}*): run tests/test_compat.py and the sweep tests, then "
        "update compat.CHECKED"
    )


def test_trial_id_of_live_and_frozen_trials() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    first, second = study.ask(), study.ask()
    assert compat.trial_id(second) != compat.trial_id(first)
    # the id is what the storage and optuna.Trial(study, id) take
    assert optuna.Trial(study, compat.trial_id(second)).number == second.number
    study.tell(compat.trial_id(first), 1.0)
    frozen = study.get_trials()[0]
    assert compat.trial_id(frozen) == compat.trial_id(first)


def test_finish_function_trial_outside_ray_is_a_no_op() -> None:
    # outside a Tune actor there is no session: nothing to wait for, and no error
    compat.finish_function_trial(0.1)


def test_finish_function_trial_stops_a_reporting_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session fields compat.finish_function_trial relies on exist on Ray's session class
    and, set as a Tune trial sets them, end a thread blocked in its next report."""
    from ray.train._internal import session as ray_session

    stop, lock = threading.Event(), threading.Lock()
    lock.acquire()
    ended = threading.Event()

    def trial() -> None:  # what tune.report does in a function trainable: wait for its turn
        lock.acquire()
        if stop.is_set():
            ended.set()

    thread = threading.Thread(target=trial, daemon=True)
    thread.start()

    class Session:
        training_started = True
        training_thread = thread
        stop_event = stop
        continue_lock = lock

    source = inspect.getsource(ray_session._TrainSession)
    for name in ("training_started", "training_thread", "stop_event", "continue_lock"):
        assert f"self.{name} =" in source, (
            f"ray's _TrainSession sets no {name}: update compat.finish_function_trial"
        )
    monkeypatch.setattr(ray_session, "get_session", lambda: Session())
    compat.finish_function_trial(5.0)
    assert ended.is_set() and not thread.is_alive()


def test_sbatch_script_and_command_of_submitit(tmp_path) -> None:
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    command = compat.submitit_command(executor.__dict__.get("_executor", executor))
    assert "submitit" in command
    script = compat.sbatch_script({"time": 5, "job_name": "wt"}, tmp_path, command, None)
    assert script.startswith("#!/bin/bash") and "#SBATCH --time=5" in script
    assert command in script
