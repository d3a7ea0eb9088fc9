"""windtunnel.files (atomic writes, file locks) and windtunnel.procs (terminate, then kill)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from windtunnel.files import LockHeld, acquire, atomic_file, atomic_write, lock
from windtunnel.procs import is_dead, terminate

pytestmark = pytest.mark.timeout(120)


def _holder(path: Path) -> subprocess.Popen:
    """Another process holding the lock on ``path`` until it is killed."""
    code = (
        "import sys, time\n"
        "from windtunnel.files import acquire\n"
        f"held = acquire({str(path)!r})\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, "first")
    assert target.read_text() == "first"
    atomic_write(target, b"\x00second", fsync=False)
    assert target.read_bytes() == b"\x00second"
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"\x00second"  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]  # no temp left
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next(tmp_path: Path) -> None:
    target = tmp_path / "main.pt"
    code = (
        "import os, sys; from windtunnel.files import atomic_file\n"
        f"with atomic_file({str(target)!r}) as f:\n"
        "    f.write(b'half'); f.flush(); print('writing', flush=True); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.wait()
    (left,) = [p.name for p in tmp_path.iterdir()]  # the killed writer's temp file
    assert left.startswith(".main.pt.") and left.endswith(".tmp")
    live = tmp_path / f".main.pt.{socket.gethostname()}.{os.getpid()}.beef.tmp"
    live.write_bytes(b"a live writer's")  # this process is alive: its temp file stays
    atomic_write(target, b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "main.pt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_lock_held_elsewhere_fails_fast_and_is_freed_by_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    proc = _holder(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockHeld, match="another `windtunnel tunnel` is running"):
            acquire(path, blocking=False, held_message="another `windtunnel tunnel` is running")
        with (
            pytest.raises(LockHeld, match=r"x\.lock is locked by another live process"),
            lock(path, blocking=False),
        ):
            pass
        assert time.monotonic() - t0 < 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no release: the kernel drops the flock
        proc.wait()
    with lock(path, blocking=False) as held:
        assert held.is_locked
    assert path.exists()  # the lock file stays (waiters share its inode)


def test_blocking_lock_waits_for_another_thread(tmp_path: Path) -> None:
    """Two threads of one process: the second waits (saying so) instead of failing as a
    'deadlock' (filelock's check for an unbounded wait on a path this process holds)."""
    path = tmp_path / "run.lock"
    order: list[str] = []
    first = acquire(path)
    waited = threading.Event()

    def second() -> None:
        with lock(path, on_wait=waited.set):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    assert waited.wait(10)
    order.append("first")
    first.release()
    t.join(10)
    assert order == ["first", "second"]


def test_terminate_then_kill(tmp_path: Path) -> None:
    """A process that ignores SIGTERM is SIGKILLed after the grace period, with its group."""
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    t0 = time.monotonic()
    assert terminate(proc, group=True, grace_s=0.5)
    assert 0.4 < time.monotonic() - t0 < 10
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while not is_dead(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert is_dead(child)  # the group went too
    # a bare pid (not our child) that ends on SIGTERM
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    assert terminate(other.pid, grace_s=10)
    assert other.wait(5) == -signal.SIGTERM
    assert terminate(other.pid)  # already gone: nothing to do
