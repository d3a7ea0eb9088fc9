"""Start the W ranks of one run on this machine, the way ``torchrun --standalone`` does.

``windtunnel train ... train.nproc_per_node=W`` re-runs its own command line as W processes
through torch's elastic launcher (torchrun's engine, used as a library): each rank gets torchrun's
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from a private rendezvous on
this host. When one rank dies the launcher stops the others (no rank hangs in a collective), and
SIGTERM, SIGINT or SIGUSR2 to this process reaches every rank, which stop at the same step
boundary and checkpoint once. Rerunning the same command resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from windtunnel.launch.outcome import usable_cores

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

T = TypeVar("T")

PREEMPTED = 75
"""Exit status of a run stopped by a signal after its checkpoint (EX_TEMPFAIL)."""
SHUTDOWN_S = 120
"""Seconds the ranks have to checkpoint after a stop signal before they are killed."""


def under_launcher() -> bool:
    """Whether this process is already one rank of a launched group (torchrun, SLURM)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_nproc(nproc: int, device: str) -> None:
    """Refuse more ranks than the machine has devices for (one GPU per rank, or one core)."""
    import torch

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = usable_cores(), "usable CPU cores"
    if nproc > have:
        raise ValueError(
            f"train.nproc_per_node={nproc} but this machine has {have} {what}: each rank needs "
            f"its own; use train.nproc_per_node<={have} (or more nodes through launcher=slurm)"
        )


def _config(nproc: int) -> Any:
    from torch.distributed.launcher.api import LaunchConfig

    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:  # split the cores between the ranks
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // nproc))
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"windtunnel-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2",
        shutdown_timeout=SHUTDOWN_S,
    )


def call_on_ranks(nproc: int, fn: Callable[[], T]) -> T:
    """``fn()`` on ``nproc`` ranks of this machine (each a fresh process; ``fn`` is pickled);
    rank 0's return value. A rank that fails stops the others and raises RuntimeError."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        out = elastic_launch(_config(nproc), _call)(fn)
    except ChildFailedError as e:
        rank, failure = _first(e)
        raise RuntimeError(f"rank {rank} of {nproc} failed: {failure.message}") from None
    return out[0]  # type: ignore[no-any-return]


def _call(fn: Callable[[], T]) -> T:
    """What each rank runs (the launcher wants a named module-level function)."""
    return fn()


def run_ranks(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m windtunnel <argv>`` as ``nproc`` ranks; the exit status of the run
    (rank 0's, or the first failing rank's), after one line on stderr if it failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(_config(nproc), sys.executable)("-m", "windtunnel", *argv)
    except ChildFailedError as e:
        rank, failure = _first(e)
        if failure.exitcode == PREEMPTED:
            return PREEMPTED
        how = (
            f"was killed by {signal.Signals(-failure.exitcode).name}"
            if failure.exitcode < 0
            else f"exited with status {failure.exitcode}"
        )
        print(
            f"rank {rank} of {nproc} {how}; the other ranks were stopped. Rerun the same "
            "command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as e:
        print(
            f"stopped by {e.sigval.name}: the ranks checkpointed at a step boundary; rerun the "
            "same command to resume",
            file=sys.stderr,
        )
        return PREEMPTED
    return 0


def _first(error: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The failure to report: the earliest (the others were stopped because of it)."""
    rank = min(error.failures, key=lambda r: error.failures[r].timestamp)
    return rank, error.failures[rank]
