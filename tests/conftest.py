"""Shared test helpers.

Integration tests talk to real services (MLflow server, SLURM, Ray). Where this machine cannot
host one they skip with the reason — except in CI (``CI=true``), where a skipped integration
test is a failure: use :func:`skip_or_fail` instead of ``pytest.skip`` for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip an integration test with ``reason``; in CI fail instead."""
    if IN_CI:
        pytest.fail(f"integration test could not run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No progress bars in tests; deterministic, single-threaded torch where it matters."""
    monkeypatch.setenv("WINDTUNNEL_NO_PROGRESS", "1")
