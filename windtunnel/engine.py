"""The training engine: model + optimizer + batches, one step loop, evaluation, checkpoints.

Kept free of tracking and files-on-disk policy (that is :mod:`windtunnel.train`), so the same
engine serves runs, the coordinate check and the benchmark.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from windtunnel.config import Resolved
from windtunnel.files import atomic_file
from windtunnel.model import Decoder, flash_attn_available
from windtunnel.mup import build_optimizer, set_lr
from windtunnel.schedule import Schedule, lr_factor


class Diverged(RuntimeError):
    """Training produced a non-finite loss, a loss above the cap, or a loss spike."""


class Pruned(RuntimeError):
    """A sweep's pruner stopped this trial on an intermediate evaluation."""


class Preempted(RuntimeError):
    """A stop was requested (SIGUSR2/SIGTERM); the state was checkpointed first."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={name} but CUDA is not available here: use device=cpu or auto"
        )
    return dev


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
    optimizer: torch.optim.Optimizer
    device: torch.device
    sample: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    """(step, micro) → (x, y): pure in its arguments, so the data position is just ``step``."""
    step: int = 0
    guard: LossGuard = field(default_factory=lambda: LossGuard(math.inf, 0.0, 0))
    stop_requested: bool = False

    @classmethod
    def build(
        cls, res: Resolved, sample: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    ) -> Engine:
        t = res.cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        device = pick_device(t.device)
        torch.manual_seed(t.seed)
        model = Decoder(res.cfg.model).to(device)
        use_flash = t.attention == "flash" or (
            t.attention == "auto" and flash_attn_available(device)
        )
        if t.attention == "flash" and not flash_attn_available(device):
            raise ValueError("train.attention=flash needs flash-attn installed and a CUDA device")
        model.configure_attention(use_flash)
        optimizer = build_optimizer(model, res.cfg.model, res.cfg.optim)
        guard = LossGuard(res.max_loss, t.divergence_factor, max(res.warmup_steps, 10))
        return cls(res, model, optimizer, device, sample, guard=guard)

    # -- precision / compile ---------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.res.cfg.train.dtype
        if dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.res.cfg.train.compile and not hasattr(self, "_compiled"):
            self._compiled = torch.compile(self.model.loss)
        return getattr(self, "_compiled", self.model.loss)

    # -- the loop --------------------------------------------------------------------------------
    def run(
        self,
        schedule: Schedule,
        stop: int,
        on_step: Callable[[int, float, float, float], None],
    ) -> None:
        """Train from ``self.step`` to ``stop``. ``on_step(step, loss, lr, seconds)`` after each
        step (step counts completed steps); raises :class:`Diverged` / :class:`Preempted`."""
        o = self.res.cfg.optim
        accum = o.grad_accum
        loss_fn = self.forward_loss()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.model.train()
        while self.step < stop:
            if self.stop_requested:
                raise Preempted(f"stop requested at step {self.step}")
            t0 = time.perf_counter()
            lr = o.lr * lr_factor(self.step, schedule)
            set_lr(self.optimizer, lr)
            total = torch.zeros((), device=self.device)
            for micro in range(accum):
                x, y = self.sample(self.step, micro)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.autocast():
                    loss = loss_fn(x, y) / accum
                loss.backward()
                total += loss.detach()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss_value = total.item()
            self.guard.check(self.step, loss_value)
            on_step(self.step, loss_value, lr, time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(
        self, batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> dict[str, float]:
        """Mean loss (nats/token) per domain on fixed validation batches."""
        self.model.eval()
        out = {}
        for domain, pairs in batches.items():
            total, count = 0.0, 0
            for x, y in pairs:
                with self.autocast():
                    loss = self.model.loss(x.to(self.device), y.to(self.device))
                total += loss.item() * y.numel()
                count += y.numel()
            out[domain] = total / count
        self.model.train()
        return out

    # -- checkpoints (model, optimizer, RNG, data position = step, guard) ------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "guard": (self.guard.ema, self.guard.ema_min),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.guard.ema, self.guard.ema_min = state["guard"]

    def save(self, path: Path) -> None:
        """Atomic: a kill during the write leaves the previous checkpoint intact."""
        with atomic_file(path) as f:
            torch.save(self.state_dict(), f)

    def load(self, path: Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
