"""The proxy model: a MiniCPM-style pre-norm decoder with μP written out in ``forward``.

RMSNorm, RoPE, SwiGLU, optional GQA, tied input/output embedding. The μP knobs (DESIGN §2)
are plain expressions in :meth:`Decoder.forward`, with the width multiplier
``m = d_model / dim_model_base``:

    x0     = scale_emb · Emb(tokens)
    x     += (scale_depth / sqrt(L)) · f(norm(x))        for f in (attention, MLP) of each block
    logits = W_out · (norm(x_L) / m)

Initialisation (:meth:`Decoder.reset_parameters`) draws hidden 2-D matrices from
``N(0, (init_std/sqrt(m))²)``; the per-group Adam learning rates live in :mod:`windtunnel.mup`.
With ``mup=False`` the same network runs in standard parametrization (no ``1/m`` anywhere),
which the coordinate check uses as the counter-example.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from windtunnel.config import ModelConfig


def flash_attn_available(device: torch.device) -> bool:
    """flash-attn is used only when importable and on a CUDA device."""
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def rope_table(d_head: int, max_len: int, theta: float) -> torch.Tensor:
    """Rotations e^{i·pos·θ_k} as a complex table [max_len, d_head/2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the head dim as complex numbers. x: [B, H, T, Dh]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, n_kv_heads, cfg.d_head
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * n_kv_heads) * cfg.d_head, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=False)
        self.use_flash = False  # set by Decoder.configure_attention

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hq, hkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        q, k, v = self.wqkv(x).split((hq * dh, hkv * dh, hkv * dh), dim=-1)
        q = apply_rope(q.view(B, T, hq, dh).transpose(1, 2), rot)  # [B, Hq, T, Dh]
        k = apply_rope(k.view(B, T, hkv, dh).transpose(1, 2), rot)  # [B, Hkv, T, Dh]
        v = v.view(B, T, hkv, dh).transpose(1, 2)
        if self.use_flash:
            from flash_attn import flash_attn_func

            y = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True
            )
            y = y.reshape(B, T, hq * dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != hq)
            y = y.transpose(1, 2).reshape(B, T, hq * dh)  # [B, T, Hq·Dh]
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.d_ff = d_ff
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.d_ff, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, n_kv_heads: int, d_ff: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, n_kv_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, d_ff)

    def forward(self, x: torch.Tensor, rot: torch.Tensor, branch_scale: float) -> torch.Tensor:
        x = x + branch_scale * self.attn(self.attn_norm(x), rot)  # μP: depth-scaled residual
        return x + branch_scale * self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """MiniCPM-style decoder. ``cfg`` must be resolved (vocab_size, d_ff, n_kv_heads set)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.d_ff <= 0 or cfg.n_kv_heads <= 0:
            raise ValueError("Decoder needs a resolved ModelConfig (see windtunnel.config.resolve)")
        self.cfg = cfg
        self.width_mult = cfg.d_model / cfg.dim_model_base if cfg.mup else 1.0
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.n_kv_heads, cfg.d_ff) for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        rope = rope_table(cfg.d_head, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope", rope, persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward (less memory)
        self.reset_parameters()

    # -- μP init ---------------------------------------------------------------------------------
    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D non-embedding matrices: μP scales their init and lr by the width."""
        return [p for n, p in self.blocks.named_parameters() if p.ndim == 2]

    def reset_parameters(self) -> None:
        std_hidden = self.cfg.init_std / math.sqrt(self.width_mult)
        std_embed = std_hidden if self.cfg.mup_scale_embedding else self.cfg.init_std
        for p in self.hidden_matrices():
            nn.init.normal_(p, 0.0, std_hidden)
        nn.init.normal_(self.embed.weight, 0.0, std_embed)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, std_embed)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def configure_attention(self, use_flash: bool) -> None:
        for block in self.blocks:
            block.attn.use_flash = use_flash

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self, tokens: torch.Tensor, *, capture: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, V]. ``capture`` (coordinate check) receives activations."""
        cfg = self.cfg
        T = tokens.shape[1]
        rot = self.rope[:T]
        branch_scale = cfg.scale_depth / math.sqrt(cfg.n_layers)

        x = cfg.scale_emb * self.embed(tokens)  # μP: embedding output multiplier
        for i, block in enumerate(self.blocks):
            # μP: each block adds (scale_depth / sqrt(L)) · f(norm(x)) for f in (attention, MLP)
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rot, branch_scale, use_reentrant=False)
            else:
                x = block(x, rot, branch_scale)
            if capture is not None:
                capture[f"block{i}"] = x.detach()
        h = self.norm(x) / self.width_mult  # μP: logits divided by the width multiplier
        logits = F.linear(h, self.embed.weight if self.lm_head is None else self.lm_head.weight)
        if capture is not None:
            capture["embed"] = (cfg.scale_emb * self.embed(tokens)).detach()
            capture["logits"] = logits.detach()
        return logits

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats."""
        return lm_loss(self(tokens), targets)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in nats (fp32), ``mean`` or ``sum`` over tokens."""
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
    )
