"""The training engine: model + optimizer + batches, one step loop, evaluation, checkpoints.

Kept free of tracking and files-on-disk policy (that is :mod:`windtunnel.train`), so the same
engine serves runs, the coordinate check and the benchmark.

On W ranks (:class:`~windtunnel.distributed.World`) the model is wrapped once, by
``train.parallel``: DDP (every rank holds the model, gradients are all-reduced) or FSDP2
(``fully_shard`` per block, then the root: parameters, gradients and AdamW state sharded). The
optimizer's μP groups are built from the module's own parameters after wrapping, so the per-group
learning rates are the single-process ones. ``sample(step, micro)`` returns this rank's rows of
the global micro-batch of (seed, step, micro): the global batch, hence the curve, does not depend
on W. The step's loss and the stop flag are reduced together, once per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from windtunnel import checkpoint
from windtunnel.config import Resolved
from windtunnel.distributed import StopRequest, World
from windtunnel.model import Decoder, flash_attn_available, lm_loss
from windtunnel.mup import build_optimizer, set_lr
from windtunnel.schedule import Schedule, lr_factor


class Diverged(RuntimeError):
    """Training produced a non-finite loss, a loss above the cap, or a loss spike."""


class Pruned(RuntimeError):
    """A sweep's pruner stopped this trial on an intermediate evaluation."""


class Preempted(RuntimeError):
    """A stop was requested (SIGUSR2/SIGTERM); the state was checkpointed first."""


def pick_device(name: str, world: World | None = None) -> torch.device:
    """The device of this rank: on CUDA with several ranks, GPU ``LOCAL_RANK``."""
    world = world or World()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={name} but CUDA is not available here: use device=cpu or auto"
        )
    if dev.type == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank {world.rank} is local rank {world.local_rank} but this node has "
                f"{torch.cuda.device_count()} GPUs: start at most one rank per GPU"
            )
        dev = torch.device("cuda", world.local_rank)
    return dev


MIN_FSDP_PARAMS = 10_000_000
"""Below this many parameters (all of them: FSDP shards the embedding too), sharding saves a few
MiB per rank and costs an all-gather of every block, twice a step: use DDP."""


def fsdp_refusal(res: Resolved, world_size: int) -> str:
    """Why FSDP is not worth it for this run ('' when it is, or when it is not asked for)."""
    total = res.non_embedding_params + res.embedding_params
    if world_size < 2 or res.cfg.train.parallel != "fsdp" or total >= MIN_FSDP_PARAMS:
        return ""
    return (
        f"train.parallel=fsdp on a {total / 1e6:.2f}M-parameter model: sharding saves "
        f"{16 * total * (1 - 1 / world_size) / 2**20:.0f} MiB per rank and costs an all-gather "
        f"of every block twice a step; use train.parallel=ddp (FSDP pays from ~"
        f"{MIN_FSDP_PARAMS / 1e6:.0f}M parameters, or when `windtunnel train --dry-run` says "
        "ddp does not fit)"
    )


def schedule_for(res: Resolved, point_index: int) -> Schedule:
    """The lr schedule of one point; all points share warmup and the stable phase."""
    s, p = res.cfg.schedule, res.points[point_index]
    return Schedule(
        kind=s.kind,
        total_steps=p.total_steps,
        warmup_steps=res.warmup_steps,
        decay_steps=p.total_steps - p.decay_start,
        decay=s.decay,
        min_lr_ratio=s.min_lr_ratio,
        half_life=s.half_life_fraction,
    )


@dataclass
class LossGuard:
    """Typed divergence detection on the training loss (checked at every logged step)."""

    max_loss: float
    factor: float
    after_step: int
    ema: float = math.nan
    ema_min: float = math.inf

    def check(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise Diverged(f"non-finite training loss ({loss}) at step {step}")
        if step >= self.after_step and loss > self.max_loss:
            raise Diverged(
                f"training loss {loss:.3f} above the cap {self.max_loss:.3f} at step {step}"
            )
        self.ema = loss if math.isnan(self.ema) else 0.9 * self.ema + 0.1 * loss
        if step >= self.after_step:
            self.ema_min = min(self.ema_min, self.ema)
            if self.factor > 0 and self.ema > self.factor * self.ema_min:
                raise Diverged(
                    f"loss spike at step {step}: smoothed loss {self.ema:.3f} > "
                    f"{self.factor} × its minimum {self.ema_min:.3f}"
                )


@dataclass
class Engine:
    """Everything that changes during training, plus how to step it."""

    res: Resolved
    model: Decoder
    """The unwrapped module (its parameters are FSDP2's DTensors when sharded)."""
    net: torch.nn.Module
    """What the loop calls: the model, its DDP wrapper, or a compiled one of these."""
    optimizer: torch.optim.Optimizer
    device: torch.device
    sample: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    """(step, micro) → this rank's (x, y): pure in its arguments, so the data position is just
    ``step``."""
    world: World = field(default_factory=World)
    step: int = 0
    guard: LossGuard = field(default_factory=lambda: LossGuard(math.inf, 0.0, 0))
    stop: StopRequest = field(default_factory=StopRequest)

    @classmethod
    def build(
        cls,
        res: Resolved,
        sample: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        world: World | None = None,
    ) -> Engine:
        t = res.cfg.train
        world = world or World()
        if t.threads:
            torch.set_num_threads(t.threads)
        device = pick_device(t.device, world)
        torch.manual_seed(t.seed)  # the same init on every rank
        model = Decoder(res.cfg.model).to(device)
        use_flash = t.attention == "flash" or (
            t.attention == "auto" and flash_attn_available(device)
        )
        if t.attention == "flash" and not flash_attn_available(device):
            raise ValueError("train.attention=flash needs flash-attn installed and a CUDA device")
        model.configure_attention(use_flash)
        model.activation_checkpointing = t.activation_checkpointing
        net: torch.nn.Module = model
        if world.distributed and t.parallel == "fsdp":
            _shard(model, bf16=_bf16(t.dtype, device), compile=t.compile)
        elif world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        if t.compile and not (world.distributed and t.parallel == "fsdp"):
            net = torch.compile(net)  # type: ignore[assignment]
        optimizer = build_optimizer(model, res.cfg.model, res.cfg.optim)
        guard = LossGuard(res.max_loss, t.divergence_factor, max(res.warmup_steps, 10))
        return cls(res, model, net, optimizer, device, sample, world, guard=guard)

    # -- precision / gradient sync ---------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if _bf16(self.res.cfg.train.dtype, self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients across ranks only on the last micro-batch of a step."""
        if not self.world.distributed:
            return contextlib.nullcontext()
        inner = getattr(self.net, "_orig_mod", self.net)
        if hasattr(inner, "no_sync"):  # DDP
            return contextlib.nullcontext() if sync else inner.no_sync()
        self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]  # FSDP2
        return contextlib.nullcontext()

    # -- the loop --------------------------------------------------------------------------------
    def run(
        self,
        schedule: Schedule,
        stop: int,
        on_step: Callable[[int, float, float, float], None],
    ) -> None:
        """Train from ``self.step`` to ``stop``. ``on_step(step, loss, lr, seconds)`` after each
        step (step counts completed steps; loss is the global batch's mean); raises
        :class:`Diverged` / :class:`Preempted` on every rank at the same step."""
        o = self.res.cfg.optim
        accum = o.grad_accum
        self.net.train()
        while self.step < stop:
            if self.stop.now(self.world):
                raise Preempted(f"{self.stop.reason} at step {self.step}")
            t0 = time.perf_counter()
            lr = o.lr * lr_factor(self.step, schedule)
            set_lr(self.optimizer, lr)
            total = torch.zeros((), device=self.device)
            for micro in range(accum):
                x, y = self.sample(self.step, micro)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.grad_sync(micro == accum - 1), self.autocast():
                    loss = lm_loss(self.net(x), y) / accum
                loss.backward()
                total += loss.detach()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss_value = self._reduce_step(total)
            self.guard.check(self.step, loss_value)
            on_step(self.step, loss_value, lr, time.perf_counter() - t0)

    def _reduce_step(self, loss: torch.Tensor) -> float:
        """The global mean loss; every rank learns whether any rank was asked to stop."""
        if not self.world.distributed:
            return float(loss.item())
        both = torch.stack([loss.float(), torch.tensor(self.stop.flag(), device=self.device)])
        loss_sum, flags = self.world.sum(both).tolist()
        self.stop.agree(flags)
        return float(loss_sum) / self.world.size

    @torch.no_grad()
    def evaluate(
        self, batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> dict[str, float]:
        """Mean loss (nats/token) per domain on fixed validation batches; each rank evaluates
        its rows of every batch and the sums are reduced (the same number on every rank)."""
        self.net.eval()
        sums = torch.zeros(2 * len(batches), dtype=torch.float64, device=self.device)
        for i, pairs in enumerate(batches.values()):
            for x, y in pairs:
                rows = self.world.share(x.shape[0])
                x, y = x[rows].to(self.device), y[rows].to(self.device)
                with self.autocast():
                    sums[2 * i] += lm_loss(self.net(x), y, reduction="sum").double()
                sums[2 * i + 1] += y.numel()
        self.world.sum(sums)
        self.net.train()
        return {d: float(sums[2 * i] / sums[2 * i + 1]) for i, d in enumerate(batches)}

    # -- checkpoints (model, optimizer, data position = step, guard) -----------------------------
    def save(self, path: Path) -> None:
        """Collective and atomic: a kill during the write leaves the previous checkpoint."""
        meta = {"step": self.step, "guard": [self.guard.ema, self.guard.ema_min]}
        checkpoint.save(
            path, self.model, self.optimizer, meta, self.world, parallel=self.res.cfg.train.parallel
        )

    def load(self, path: Path) -> None:
        meta = checkpoint.load(path, self.model, self.optimizer, self.world)
        self.step = int(meta["step"])
        self.guard.ema, self.guard.ema_min = (float(v) for v in meta["guard"])


def _bf16(dtype: str, device: torch.device) -> bool:
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")


def _shard(model: Decoder, *, bf16: bool, compile: bool) -> None:
    """FSDP2: each block is one unit (all-gathered for its forward and backward), then the root
    (embedding, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        if compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
