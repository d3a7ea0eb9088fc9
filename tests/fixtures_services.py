"""Session fixtures for real services used by the launch tests: a SLURM cluster and a local Ray.

Register with ``pytest_plugins = ["fixtures_services"]`` in a test module. Where a service cannot
run here the fixture calls ``skip_or_fail`` with the reason (a failure in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, skip_or_fail

SLURM_SH = REPO / "scripts" / "slurm.sh"
SLURM_CANNOT_HOST = {3, 4}  # slurm.sh: not root / not Debian; packages not installable


def _status_ok() -> bool:
    r = subprocess.run(
        ["bash", str(SLURM_SH), "status"], capture_output=True, text=True, timeout=60
    )
    return r.returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict]:
    """A single-node SLURM cluster with accounting and preemption (partitions `low`, `high`).

    Brought up with ``scripts/slurm.sh up``; brought down at the end only if this session
    started it.
    """
    if os.environ.get("WINDTUNNEL_NO_SLURM"):
        skip_or_fail("WINDTUNNEL_NO_SLURM is set")
    was_up = shutil.which("sinfo") is not None and _status_ok()
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            ["bash", str(SLURM_SH), "up"], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/slurm.sh up did not finish within 600 s")
    if r.returncode in SLURM_CANNOT_HOST:
        skip_or_fail(f"no SLURM cluster here: {r.stderr.strip().splitlines()[-1]}")
    if r.returncode != 0:
        pytest.fail(f"scripts/slurm.sh up failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    info = {"up_s": time.monotonic() - t0, "cpus": os.cpu_count() or 1, "was_up": was_up}
    yield info
    if not was_up:
        subprocess.run(["bash", str(SLURM_SH), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (``ray.init(address="local")``), shut down at the end."""
    from windtunnel.launch.ray_launcher import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError as e:
        skip_or_fail(f"ray is not installed: {e}")
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count() or 1)
        except Exception as e:
            skip_or_fail(f"a local Ray could not start: {e}")
        started = True
    yield None
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def submitit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root folder for submitit job folders (each launcher makes a fresh one inside)."""
    return tmp_path_factory.mktemp("submitit")
