"""Files several processes share: atomic writes, and file locks (``flock`` through filelock).

- :func:`atomic_write` / :func:`atomic_file`: the new content goes to a temporary file in the
  same folder, is flushed and fsynced, then ``os.replace``-d over the target: a reader sees the
  old file or the new one, never a torn one, whenever the writer is killed.
- :func:`lock` / :func:`acquire`: an exclusive lock on a lock file, held through an open file
  descriptor (``filelock.FileLock``: ``flock`` on Linux), so the kernel releases it when its
  holder dies, SIGKILL included. Non-blocking: :class:`LockHeld` at once when another process
  (or another lock object in this one) holds it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from windtunnel.procs import is_dead

WAIT_SLICE_S = 60.0
"""A blocking wait is made of timed waits of this length (filelock refuses an unbounded wait on a
path another lock object of this process holds, as a deadlock, even when another thread holds it
and will release it)."""


class LockHeld(BlockingIOError):
    """The lock file is held by another process (or another lock object of this process)."""

    def __init__(self, path: str | os.PathLike[str], what: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(what or f"{self.path} is locked by another live process")


def acquire(
    path: str | os.PathLike[str],
    *,
    blocking: bool = True,
    on_wait: Callable[[], Any] | None = None,
    held_message: str | None = None,
    thread_local: bool = True,
) -> Any:
    """Take an exclusive lock on ``path`` (created if missing, with its folder) and return it
    held (a ``filelock.FileLock``: ``release()`` it, or use it as a context manager).

    ``blocking=False`` raises :class:`LockHeld` (with ``held_message`` if given) when it is held;
    otherwise the call waits, after calling ``on_wait()`` once if it has to. Pass
    ``thread_local=False`` for a lock released from another thread than the one taking it.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=thread_local)
    try:
        lock.acquire(blocking=False)
        return lock
    except Timeout:
        if not blocking:
            raise LockHeld(path, held_message) from None
    if on_wait is not None:
        on_wait()
    while True:
        try:
            lock.acquire(timeout=WAIT_SLICE_S)
            return lock
        except Timeout:
            continue


@contextlib.contextmanager
def lock(
    path: str | os.PathLike[str],
    *,
    blocking: bool = True,
    on_wait: Callable[[], Any] | None = None,
    held_message: str | None = None,
) -> Iterator[Any]:
    """Hold an exclusive lock on ``path`` inside the ``with`` block; see :func:`acquire`."""
    held = acquire(path, blocking=blocking, on_wait=on_wait, held_message=held_message)
    try:
        yield held
    finally:
        held.release()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` when the block
    ends without an exception (else it is removed and ``path`` is untouched).

    The temporary file is ``.<name>.<host>.<pid>.<random>.tmp`` beside ``path`` (hidden, and
    unique, so that concurrent writers never share one). One left by a writer of this host that
    was killed mid-write (a preempted checkpoint: as large as the model) is removed by the next.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{socket.gethostname()}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = stale.name[len(prefix) :].split(".")[0]
        if pid.isdigit() and is_dead(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()
    tmp = path.with_name(f"{prefix}{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = True) -> None:
    """Replace ``path``'s content with ``data`` (str: UTF-8) atomically; see :func:`atomic_file`.

    ``fsync=False`` skips the fsync (a kill still never tears the file; a power cut might) for
    small bookkeeping files rewritten at every step.
    """
    with atomic_file(path, fsync=fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)
