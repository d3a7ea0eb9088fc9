"""μP bookkeeping that is not in ``forward``: width multiplier and per-group Adam settings.

MiniCPM's rules (DESIGN §2): hidden 2-D matrices train with ``lr / m`` and weight decay; the
(tied) embedding and the RMSNorm gains train with the base ``lr`` and no weight decay, unless
``mup_scale_embedding`` puts the embedding with the hidden matrices. Every group carries its
``lr_scale`` so that the schedule multiplies ``base lr · lr_scale · schedule(step)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from windtunnel.config import ModelConfig, OptimConfig


def width_multiplier(cfg: ModelConfig) -> float:
    """``m = d_model / dim_model_base`` under μP, 1 under standard parametrization."""
    return cfg.d_model / cfg.dim_model_base if cfg.mup else 1.0


@dataclass(frozen=True)
class GroupSpec:
    name: str
    lr_scale: float
    weight_decay: float


def group_specs(model_cfg: ModelConfig, optim_cfg: OptimConfig) -> dict[str, GroupSpec]:
    """The optimizer groups of the decoder (pure)."""
    m = width_multiplier(model_cfg)
    embed_scale = 1.0 / m if model_cfg.mup_scale_embedding else 1.0
    return {
        "hidden": GroupSpec("hidden", 1.0 / m, optim_cfg.weight_decay),
        "embedding": GroupSpec("embedding", embed_scale, 0.0),
        "vector": GroupSpec("vector", 1.0, 0.0),
    }


def param_groups(
    model: torch.nn.Module, model_cfg: ModelConfig, optim_cfg: OptimConfig
) -> list[dict[str, Any]]:
    """AdamW parameter groups with μP learning-rate scales (``lr_scale`` key)."""
    specs = group_specs(model_cfg, optim_cfg)
    hidden_ids = {id(p) for p in model.hidden_matrices()}  # type: ignore[operator]
    buckets: dict[str, list[torch.nn.Parameter]] = {k: [] for k in specs}
    for name, p in model.named_parameters():
        if id(p) in hidden_ids:
            buckets["hidden"].append(p)
        elif name.startswith(("embed.", "lm_head.")):
            buckets["embedding"].append(p)
        else:
            buckets["vector"].append(p)
    return [
        {
            "name": k,
            "params": ps,
            "lr": optim_cfg.lr * specs[k].lr_scale,
            "lr_scale": specs[k].lr_scale,
            "weight_decay": specs[k].weight_decay,
        }
        for k, ps in buckets.items()
        if ps
    ]


def build_optimizer(
    model: torch.nn.Module, model_cfg: ModelConfig, optim_cfg: OptimConfig
) -> torch.optim.AdamW:
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, model_cfg, optim_cfg),
        lr=optim_cfg.lr,
        betas=optim_cfg.betas,
        eps=optim_cfg.eps,
        fused=fused or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply a scheduled base lr to every group, keeping its μP scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
