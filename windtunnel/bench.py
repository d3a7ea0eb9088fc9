"""Training throughput against this machine's own matmul peak, and against a plain PyTorch loop.

``windtunnel bench`` measures, in one process: the fp32 (CPU) or bf16 (CUDA) ``torch.mm`` peak;
then for each model the tokens/s and achieved FLOP/s of windtunnel's engine (μP groups, clipping,
schedule, loss guard: the real training step) and of a plain reference loop of the same shape
(SDPA, AdamW, tied head, SwiGLU) written here in 30 lines. FLOPs use the exact count of
:mod:`windtunnel.flops` for both, so the ratios compare like with like.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from windtunnel.config import ModelConfig, RunConfig, resolve
from windtunnel.engine import Engine, pick_device, schedule_for

BENCH_DEFAULTS = ["data.vocab_size=4096", "data.seq_len=256", "optim.batch_size=16", "tracker=none"]


def matmul_peak(
    device: torch.device, sizes: tuple[int, ...] = (1024, 2048), reps: int = 5
) -> float:
    """Best FLOP/s of a square ``torch.mm`` (fp32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in sizes if device.type == "cpu" else (4096, 8192):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 2 * d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(self.n1(x)).view(B, T, 3, self.heads, D // self.heads).transpose(1, 3)
        q, k, v = qkv.unbind(2)  # [B, H, T, Dh]
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, D))
        g, u = self.up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class PlainDecoder(nn.Module):
    """The reference: what a competent plain PyTorch loop looks like (rotary, no μP)."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_PlainBlock(d, heads, d_ff) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        dh = d // heads
        angles = torch.outer(torch.arange(4096.0), 10000.0 ** (-torch.arange(0, dh, 2) / dh))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        cos, sin = self.cos[: x.shape[1]], self.sin[: x.shape[1]]
        for b in self.blocks:
            h = b(h, cos, sin)
        logits = F.linear(self.norm(h), self.emb.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


@dataclass
class BenchRow:
    model: str
    N: int
    flops_per_token: int
    tokens_per_s: float
    flops_per_s: float
    share_of_peak: float
    baseline_tokens_per_s: float = math.nan
    ratio_to_baseline: float = math.nan
    compiled_tokens_per_s: float = math.nan
    compiled_share_of_peak: float = math.nan
    compile_seconds: float = math.nan


@dataclass
class BenchReport:
    device: str
    threads: int
    matmul_peak_flops: float
    shape: dict[str, int]
    rows: list[BenchRow] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"device {self.device}, {self.threads} threads, matmul peak {self.matmul_peak_flops / 1e9:.1f} GFLOP/s; "
            f"vocab {self.shape['vocab']}, seq {self.shape['seq_len']}, batch {self.shape['batch']}",
            f"{'model':<14}{'N':>10}{'tok/s':>10}{'GFLOP/s':>10}{'of peak':>9}{'plain tok/s':>13}"
            f"{'vs plain':>10}{'compiled':>10}{'of peak':>9}{'compile s':>11}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.model:<14}{r.N:>10,}{r.tokens_per_s:>10.0f}{r.flops_per_s / 1e9:>10.1f}"
                f"{r.share_of_peak:>9.1%}{r.baseline_tokens_per_s:>13.0f}{r.ratio_to_baseline:>10.2f}"
                f"{r.compiled_tokens_per_s:>10.0f}{r.compiled_share_of_peak:>9.1%}{r.compile_seconds:>11.1f}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _time_steps(step: Any, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


def _engine_tokens_per_s(
    res: Any, x: torch.Tensor, y: torch.Tensor, steps: int
) -> tuple[float, float]:
    """(tokens/s, seconds of the first step) of windtunnel's real training step."""
    engine = Engine.build(res, lambda step, micro: (x, y))
    schedule = schedule_for(res, 0)

    def engine_step() -> None:
        engine.run(schedule, engine.step + 1, lambda *a: None)

    t0 = time.perf_counter()
    engine_step()  # includes torch.compile's compilation when on
    first = time.perf_counter() - t0
    return steps * x.numel() / _time_steps(engine_step, steps, 2, engine.device), first


def _plain_tokens_per_s(res: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    m = res.cfg.model
    device = pick_device(res.cfg.train.device)
    torch.manual_seed(0)
    plain = PlainDecoder(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff).to(device)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    xd, yd = x.to(device), y.to(device)
    bf16 = device.type == "cuda"

    def plain_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = plain(xd, yd)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return steps * x.numel() / _time_steps(plain_step, steps, 3, device)


def bench_model(
    cfg: RunConfig, *, steps: int, baseline: bool, peak: float, compiled: bool = True
) -> BenchRow:
    """Eager engine, plain reference loop, and the engine under torch.compile, same batch."""
    res = resolve(cfg, cfg.data.vocab_size)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(
        0, res.cfg.model.vocab_size, (cfg.optim.batch_size, cfg.data.seq_len + 1), generator=gen
    )
    x, y = data[:, :-1], data[:, 1:]
    tps, _ = _engine_tokens_per_s(res, x, y, steps)
    row = BenchRow(
        model=res.cfg.model.name,
        N=res.non_embedding_params,
        flops_per_token=res.flops_per_token,
        tokens_per_s=tps,
        flops_per_s=tps * res.flops_per_token,
        share_of_peak=tps * res.flops_per_token / peak,
    )
    if baseline:
        row.baseline_tokens_per_s = _plain_tokens_per_s(res, x, y, steps)
        row.ratio_to_baseline = tps / row.baseline_tokens_per_s
    if compiled:
        train_c = dataclasses.replace(res.cfg.train, compile=True)
        res_c = dataclasses.replace(res, cfg=dataclasses.replace(res.cfg, train=train_c))
        ctps, first = _engine_tokens_per_s(res_c, x, y, steps)
        row.compiled_tokens_per_s = ctps
        row.compiled_share_of_peak = ctps * res.flops_per_token / peak
        row.compile_seconds = first
    return row


def run_bench(
    cfg: RunConfig,
    *,
    models: list[ModelConfig],
    steps: int = 30,
    baseline: bool = True,
    compiled: bool = True,
) -> BenchReport:
    """Benchmark each model config on ``cfg``'s data shape and device."""
    device = pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    peak = matmul_peak(device)
    report = BenchReport(
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(),
        matmul_peak_flops=peak,
        shape={
            "vocab": cfg.data.vocab_size,
            "seq_len": cfg.data.seq_len,
            "batch": cfg.optim.batch_size,
        },
    )
    for model_cfg in models:
        one = dataclasses.replace(
            cfg, model=dataclasses.replace(model_cfg, vocab_size=cfg.data.vocab_size)
        )
        report.rows.append(
            bench_model(one, steps=steps, baseline=baseline, peak=peak, compiled=compiled)
        )
    return report
