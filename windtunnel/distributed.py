"""The ranks of one run: who am I, how to agree, and when to stop.

A run on W ranks follows torchrun's environment contract (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), whoever started the ranks: ``torchrun``,
``windtunnel train train.nproc_per_node=W`` (which runs torch's own launcher) or SLURM through
submitit. Without those variables the run is one process and nothing here talks to anyone.

:class:`StopRequest` is the one place that knows a stop was asked for (SIGUSR2/SIGTERM, a SLURM
preemption, a pruner): a signal only sets a flag; the training loop reduces the flag with the
step's loss, so every rank sees the request at the same step boundary and they all stop there.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""torchrun's environment contract."""


class RendezvousError(ValueError):
    """The environment does not describe a usable group of ranks."""


@dataclass(frozen=True)
class World:
    """This process's place among the run's ranks (``size == 1``: a plain single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, MLflow and the journal."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- agreement -------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def decide(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (for decisions rank 0 makes from files only it
        writes: whether a point is done, whether a checkpoint exists)."""
        if not self.distributed:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in place; returns the tensor)."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def share(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` rows (sizes differ by at most one)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world described by torchrun's variables; a single process when they are absent."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return World()
    missing = [k for k in ENV if not env.get(k)]
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 and missing:
        raise RendezvousError(
            f"WORLD_SIZE={env.get('WORLD_SIZE')} but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start the ranks with "
            "`windtunnel train ... train.nproc_per_node=N`, `torchrun --nproc-per-node N -m "
            "windtunnel train ...`, or a SLURM launcher, which set them all"
        )
    try:
        world = World(
            rank=int(env.get("RANK", "0")),
            size=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
        )
    except ValueError as e:
        raise RendezvousError(f"torchrun variables are not integers: {e}") from None
    if not 0 <= world.rank < world.size:
        raise RendezvousError(f"RANK={world.rank} is outside WORLD_SIZE={world.size}")
    return world


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the run's process group for the duration (gloo on CPU, nccl on CUDA); nothing for a
    single process or when a group is already up (a caller that owns it)."""
    if not world.distributed or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    # every rank is done with the group before any tears it down (gloo aborts a rank whose
    # peer disappears mid-teardown)
    dist.barrier()
    dist.destroy_process_group()


class StopRequest:
    """A stop asked of the run: set by a signal handler (only a flag, safe anywhere), agreed by
    all ranks at a step boundary through :meth:`agree`."""

    def __init__(self) -> None:
        self.requested = False
        """Asked of this process (a signal, a stopper)."""
        self.agreed = False
        """Known to every rank (set by the step's reduction)."""
        self.reason = ""

    def request(self, reason: str = "stop requested") -> None:
        if not self.requested:
            self.requested, self.reason = True, reason

    def flag(self) -> float:
        return 1.0 if self.requested else 0.0

    def agree(self, summed_flag: float) -> None:
        """After the step's reduction: if any rank asked, every rank stops at this boundary."""
        if summed_flag > 0:
            self.agreed = True
            self.reason = self.reason or "stop requested on another rank"

    def now(self, world: World) -> bool:
        """Stop at this step boundary? One process: when asked. Several: when all know."""
        return self.agreed if world.distributed else self.requested

    @contextmanager
    def on_signals(self, enabled: bool = True) -> Iterator[None]:
        """SIGUSR2 (SLURM preemption) and SIGTERM ask for a stop while inside."""
        if not enabled:
            yield
            return
        sigs = [signal.SIGUSR2, signal.SIGTERM]
        old = {s: signal.getsignal(s) for s in sigs}

        def handler(signum: int, frame: Any) -> None:
            self.request(f"{signal.Signals(signum).name} received")

        for s in sigs:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
