"""Memory and time of a training run before it starts (pure: no torch, no I/O).

``windtunnel train ... --dry-run`` prints :func:`table`; a run whose chosen mode does not fit
``margin`` (90%) of one GPU's memory is refused with :meth:`Estimate.refusal`, naming the least
change that fits (:func:`suggest`).

**Memory per rank** (bytes; P parameters; S = W for ``fsdp``, 1 for ``ddp``; c = 2 under bf16
autocast, 4 in fp32; the residual stream is fp32 either way, as the embedding output is):

* states: fp32 master weights ``4P/S``, fp32 gradients ``4P/S``, AdamW moments ``8P/S`` (ddp
  with ``gradient_as_bucket_view=True``; without it DDP's buckets hold another ``4P``);
* weights in compute precision, forward/backward only. ddp: autocast's bf16 copy of every matrix
  and of the head (``2·(matrix params + V·d)``), kept by the matmuls for backward. fsdp (FSDP2
  ``fully_shard`` per block with a ``MixedPrecisionPolicy(param_dtype=bf16)``): the root group
  (embedding, head, final norm) unsharded for the whole step plus two blocks (the current one and
  the prefetched next), ``c·(root + 2·block)``, and one unsharded gradient ``c·max(root, block)``;
* activations at the per-rank micro-batch ``b = ⌈batch_size / (grad_accum · W)⌉`` of T tokens,
  counted as the tensors autograd keeps for backward (the method of Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", §4.1, adapted to this
  decoder: RMSNorm, RoPE, fused QKV and SwiGLU, flash/memory-efficient SDPA so no T² scores,
  no dropout). With q = n_heads·d_head, k = n_kv_heads·d_head, f = d_ff, per token and layer:
  ``attention = 4d (norm input) + c·(d + (q + 2k) + (q + k) + q) + 4·n_heads``
  (QKV input, the QKV output kept alive by V, rotated Q and K, attention output, log-sum-exp);
  ``mlp = 4d + c·(d + 2f + f + f)`` (norm input, W13 input, gate/up, SiLU output, W2 input);
  MHA in bf16: ``24d + 8f + 4·n_heads``. Plus ``4d + c·d + 16`` per token (final norm, head
  input, token ids and targets). Activation checkpointing keeps each block's fp32 input
  (``4d`` per layer) plus one block's activations, recomputed in backward;
* logits: ``12·V`` bytes per token, the fp32 log-softmax kept for backward, its gradient and the
  gradient of the logits (all fp32: the loss upcasts), at the start of backward;
* optimizer step: ``4P/S``, the temporary of AdamW's ``foreach`` update (activations are freed);
* a fixed 1 GiB for the CUDA context, cuBLAS workspaces and NCCL buffers.

Peak = states + fixed + max(forward/backward: weights + activations + logits, optimizer step).
Counted for eager execution; ``torch.compile`` keeps fewer activations, so there it errs high.

**Time:** ``tokens/s = W · MFU · peak / F`` with F the exact training FLOPs per token of
:mod:`windtunnel.flops`; activation checkpointing adds one forward of the blocks
(``2·matrix params + 2·L·T·q``) to F at the same utilisation. MFU defaults to the H100
measurements of docs/benchmarks.md for the model's N (:func:`default_mfu`). The run trains the trunk to its last
branch point plus every decay branch (:func:`trained_tokens`); evaluation is not counted.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from windtunnel import flops
from windtunnel.config import Resolved, model_shape
from windtunnel.flops import Shape

GiB = 1024**3
MiB = 1024**2
RESIDUAL_BYTES = 4
"""The residual stream is fp32: the embedding output is, and autocast leaves additions alone."""
RUNTIME_BYTES = 1 * GiB
"""CUDA context, cuBLAS workspaces, NCCL buffers: a fixed allowance."""
MARGIN = 0.9
"""Share of a GPU's memory a run may plan to use (the rest: fragmentation, allocator slack)."""


@dataclass(frozen=True, kw_only=True)
class GPU:
    """One kind of accelerator."""

    name: str
    peak_flops: float
    """Dense bf16 peak FLOP/s (vendor datasheet, no sparsity)."""
    memory_bytes: int
    """Total device memory as nvidia-smi / rocm-smi report it (check yours with
    ``nvidia-smi --query-gpu=memory.total --format=csv``)."""


GPUS: dict[str, GPU] = {
    "a100": GPU(name="A100 80GB", peak_flops=312e12, memory_bytes=81920 * MiB),
    "a100-40gb": GPU(name="A100 40GB", peak_flops=312e12, memory_bytes=40960 * MiB),
    "h100": GPU(name="H100 80GB", peak_flops=989e12, memory_bytes=81559 * MiB),
    "h200": GPU(name="H200 141GB", peak_flops=989e12, memory_bytes=143771 * MiB),
    "b200": GPU(name="B200 180GB", peak_flops=2250e12, memory_bytes=183359 * MiB),
    "l40s": GPU(name="L40S 48GB", peak_flops=362e12, memory_bytes=46068 * MiB),
    "a10g": GPU(name="A10G 24GB", peak_flops=125e12, memory_bytes=23028 * MiB),
    "mi300x": GPU(name="MI300X 192GB", peak_flops=1307e12, memory_bytes=205_822_885_888),
}
"""GPU kinds by the name ``--gpu`` takes."""

H100_MATMUL_PEAK = 777e12
"""bf16 ``torch.mm`` peak measured on the H100 of docs/benchmarks.md (the MFU there is of this)."""
MEASURED_MFU: tuple[tuple[int, float, float], ...] = (
    (9_426_240, 0.077, 0.223),
    (108_552_960, 0.164, 0.392),
    (498_614_592, 0.260, 0.486),
)
"""(non-embedding N, eager MFU, compiled MFU) of the measured matmul peak: one H100, bf16,
seq 2048, batch 8, vocab 122,753 (docs/benchmarks.md, ``benchmarks/bench_gpu.py``)."""


def default_mfu(n: int, compiled: bool) -> float:
    """MFU of the datasheet peak for N non-embedding parameters: the H100 measurements
    converted to the datasheet peak, interpolated in log-log and held beyond their ends."""
    scale = H100_MATMUL_PEAK / GPUS["h100"].peak_flops
    pts = [(math.log(m), math.log(scale * (c if compiled else e))) for m, e, c in MEASURED_MFU]
    x = min(max(math.log(n), pts[0][0]), pts[-1][0])
    (x0, y0), (x1, y1) = next((a, b) for a, b in itertools.pairwise(pts) if x <= b[0])
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def measured_range(n: int) -> bool:
    """Whether N lies within the models whose MFU was measured."""
    return MEASURED_MFU[0][0] <= n <= MEASURED_MFU[-1][0]


MFU_SOURCE = (
    "MFU: measured on one H100 (docs/benchmarks.md; bf16, seq 2048), of its 989 TFLOP/s "
    "datasheet peak: eager 6.0% (9M), 12.9% (0.1B), 20.4% (0.5B); compiled (train.compile=true) "
    "17.5%, 30.8%, 38.2%; interpolated in N, held beyond; --mfu overrides"
)


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What fixes a run's memory and time: the model, the batch, the ranks, the precision."""

    shape: Shape
    seq_len: int
    batch_size: int
    """Sequences per optimizer step, all ranks together."""
    grad_accum: int
    world_size: int
    parallel: str
    """``ddp`` or ``fsdp``."""
    activation_checkpointing: bool = False
    compute_bytes: int = 2
    """2 under bf16 autocast, 4 in fp32."""
    tokens: int = 0
    """Tokens the run trains."""

    @property
    def micro_batch(self) -> int:
        """Sequences per rank per forward (the largest share when the split is uneven)."""
        return math.ceil(self.batch_size / (self.grad_accum * self.world_size))


@dataclass(frozen=True, kw_only=True)
class Memory:
    """Bytes per rank, by component."""

    parameters: float
    gradients: float
    optimizer: float
    weights: float
    activations: float
    logits: float
    optimizer_step: float
    runtime: float = RUNTIME_BYTES

    @property
    def forward_backward(self) -> float:
        return self.weights + self.activations + self.logits

    @property
    def peak(self) -> float:
        states = self.parameters + self.gradients + self.optimizer + self.runtime
        return states + max(self.forward_backward, self.optimizer_step)

    def to_json(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "peak": self.peak}


# -- memory --------------------------------------------------------------------------------------


def total_params(s: Shape) -> int:
    return flops.non_embedding_params(s) + flops.embedding_params(s)


def block_params(s: Shape) -> int:
    """Parameters of one block (attention, MLP, two norms)."""
    return flops.matrix_params(s) // s.n_layers + 2 * s.d_model


def root_params(s: Shape) -> int:
    """Parameters outside the blocks: embedding, untied head, final norm (FSDP's root group)."""
    return flops.embedding_params(s) + s.d_model


def layer_activation_bytes(s: Shape, c: int) -> int:
    """Bytes one block keeps for backward, per token (see the module docstring)."""
    d, f = s.d_model, s.d_ff
    q, k = s.n_heads * s.d_head, s.n_kv_heads * s.d_head
    attention = RESIDUAL_BYTES * d + c * (d + (q + 2 * k) + (q + k) + q) + 4 * s.n_heads
    mlp = RESIDUAL_BYTES * d + c * (d + 2 * f + f + f)
    return attention + mlp


def activation_bytes(s: Shape, c: int, tokens: int, checkpointing: bool) -> int:
    """Activations of a micro-batch of ``tokens`` tokens, without the logits."""
    layer = layer_activation_bytes(s, c)
    final = RESIDUAL_BYTES * s.d_model + c * s.d_model + 16
    if checkpointing:
        per_token = s.n_layers * RESIDUAL_BYTES * s.d_model + layer + final
    else:
        per_token = s.n_layers * layer + final
    return tokens * per_token


def logits_bytes(s: Shape, tokens: int) -> int:
    """The loss's fp32 log-softmax, its gradient and the logits' gradient."""
    return tokens * s.vocab_size * 12


def memory(setup: Setup, parallel: str | None = None) -> Memory:
    """Peak bytes per rank of ``setup`` under ``parallel`` (default: the setup's own)."""
    s, c = setup.shape, setup.compute_bytes
    mode = parallel or setup.parallel
    p = total_params(s)
    shards = setup.world_size if mode == "fsdp" else 1
    if mode == "fsdp":
        root, block = root_params(s), block_params(s)
        weights = c * (root + 2 * block) + c * max(root, block)
    else:
        weights = 2 * (flops.matrix_params(s) + s.vocab_size * s.d_model) if c == 2 else 0
    tokens = setup.micro_batch * setup.seq_len
    return Memory(
        parameters=4 * p / shards,
        gradients=4 * p / shards,
        optimizer=8 * p / shards,
        weights=weights,
        activations=activation_bytes(s, c, tokens, setup.activation_checkpointing),
        logits=logits_bytes(s, tokens),
        optimizer_step=4 * p / shards,
    )


# -- time ----------------------------------------------------------------------------------------


def trained_tokens(res: Resolved) -> int:
    """Tokens a run trains: the trunk to its last branch point plus every decay branch."""
    trunk = max(p.decay_start for p in res.points)
    return res.tokens_per_step * (trunk + sum(p.total_steps - p.decay_start for p in res.points))


def flops_per_token(setup: Setup) -> int:
    """Training FLOPs per token actually executed (recomputation included)."""
    s = setup.shape
    f = flops.flops_per_token(s, setup.seq_len)
    if setup.activation_checkpointing:
        f += 2 * flops.matrix_params(s) + 2 * s.n_layers * setup.seq_len * s.n_heads * s.d_head
    return f


def tokens_per_second(setup: Setup, gpu: GPU, mfu: float) -> float:
    return setup.world_size * mfu * gpu.peak_flops / flops_per_token(setup)


# -- the verdict ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Change:
    """A change that makes a run fit: config overrides and, maybe, more GPUs."""

    overrides: dict[str, Any]
    """Dotted config keys → values (``{"optim.grad_accum": 8}``)."""
    world_size: int
    setup: Setup
    """The setup with the change applied."""
    peak: float

    def text(self, before: Setup) -> str:
        words = [f"{k}={_show(v)}" for k, v in self.overrides.items()]
        out = f"set {' '.join(words)}" if words else ""
        if self.world_size != before.world_size:
            out += (" and " if out else "") + f"run on {self.world_size} GPUs"
        b = self.setup.micro_batch
        return (
            f"{out} (micro-batch {b} sequence{'s' if b > 1 else ''} per rank, "
            f"{self.peak / GiB:.1f} GiB per rank)"
        )


def _show(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def fits(setup: Setup, gpu: GPU, margin: float = MARGIN) -> bool:
    return memory(setup).peak <= margin * gpu.memory_bytes


def _more_accum(s: Setup) -> Iterator[Setup]:
    """``s`` with each larger grad_accum that splits the batch evenly over the ranks, ascending."""
    for a in range(s.grad_accum + 1, s.batch_size // s.world_size + 1):
        if s.batch_size % (a * s.world_size) == 0:
            yield dataclasses.replace(s, grad_accum=a)


def _changes_at(s: Setup) -> Iterator[Setup]:
    """Changes at ``s``'s world size, least invasive first: fsdp (with several ranks), more
    grad_accum, activation checkpointing, then those together."""
    yield s
    sharded = dataclasses.replace(s, parallel="fsdp") if s.world_size > 1 else s
    yield sharded
    yield from _more_accum(s)
    recompute = dataclasses.replace(s, activation_checkpointing=True)
    yield recompute
    yield from _more_accum(sharded)
    both = dataclasses.replace(sharded, activation_checkpointing=True)
    yield both
    yield from _more_accum(both)


def suggest(setup: Setup, gpu: GPU, margin: float = MARGIN) -> Change | None:
    """The least invasive change that fits: at the setup's world size first, then on twice,
    four times … as many GPUs (while every rank gets whole micro-batches); None if none fits."""
    world = setup.world_size
    while True:
        for s in _changes_at(dataclasses.replace(setup, world_size=world)):
            even = s.batch_size % (s.grad_accum * world) == 0
            if (even or world == setup.world_size) and fits(s, gpu, margin):
                return _change(setup, s)
        world *= 2
        if setup.grad_accum * world > setup.batch_size:
            return None


def _change(before: Setup, after: Setup) -> Change:
    overrides: dict[str, Any] = {}
    if after.parallel != before.parallel:
        overrides["train.parallel"] = after.parallel
    if after.grad_accum != before.grad_accum:
        overrides["optim.grad_accum"] = after.grad_accum
    if after.activation_checkpointing != before.activation_checkpointing:
        overrides["train.activation_checkpointing"] = after.activation_checkpointing
    return Change(
        overrides=overrides,
        world_size=after.world_size,
        setup=after,
        peak=memory(after).peak,
    )


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Memory (both modes), speed and cost of a run on ``world_size`` GPUs of one kind."""

    model: str
    setup: Setup
    gpu_key: str
    gpu: GPU
    mfu: float
    margin: float
    memory: dict[str, Memory]
    """``ddp`` and ``fsdp``."""
    tokens_per_s: float
    mfu_note: str = ""
    """Where the MFU comes from, when it is the default."""
    change: Change | None
    """None when the run fits (or when nothing found fits: see :attr:`fits`)."""

    @property
    def usable_bytes(self) -> float:
        return self.margin * self.gpu.memory_bytes

    @property
    def fits(self) -> bool:
        return self.memory[self.setup.parallel].peak <= self.usable_bytes

    @property
    def wall_seconds(self) -> float:
        return self.setup.tokens / self.tokens_per_s

    @property
    def gpu_hours(self) -> float:
        return self.wall_seconds / 3600 * self.setup.world_size

    def refusal(self) -> str:
        """One line: what does not fit, by how much, and what to change ('' when it fits)."""
        if self.fits:
            return ""
        s, need = self.setup, self.memory[self.setup.parallel].peak
        head = (
            f"does not fit: {s.parallel} with micro-batch {s.micro_batch} × {s.seq_len} tokens "
            f"per rank on {s.world_size} × {self.gpu.name} needs {need / GiB:.1f} GiB per rank, "
            f"{(need - self.usable_bytes) / GiB:.1f} GiB over the {self.usable_bytes / GiB:.1f} "
            f"GiB usable ({self.margin:.0%} of {self.gpu.memory_bytes / GiB:.1f} GiB); "
        )
        if self.change is None:
            return head + (
                "no change of parallel mode, grad_accum, activation checkpointing or GPU count "
                "fits: lower data.seq_len or choose a smaller model"
            )
        return head + self.change.text(s)

    def to_json(self) -> dict[str, Any]:
        s = self.setup
        return {
            "dry_run": True,
            "model": self.model,
            "gpu": self.gpu_key,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "usable_bytes": self.usable_bytes,
            "world_size": s.world_size,
            "parallel": s.parallel,
            "activation_checkpointing": s.activation_checkpointing,
            "compute_dtype": "bfloat16" if s.compute_bytes == 2 else "float32",
            "batch_size": s.batch_size,
            "grad_accum": s.grad_accum,
            "micro_batch": s.micro_batch,
            "seq_len": s.seq_len,
            "params": total_params(s.shape),
            "memory": {mode: m.to_json() for mode, m in self.memory.items()},
            "peak_bytes": self.memory[s.parallel].peak,
            "fits": self.fits,
            "mfu": self.mfu,
            "mfu_note": self.mfu_note,
            "peak_flops": self.gpu.peak_flops,
            "flops_per_token": flops_per_token(s),
            "tokens_per_s": self.tokens_per_s,
            "tokens": s.tokens,
            "wall_hours": self.wall_seconds / 3600,
            "gpu_hours": self.gpu_hours,
            "change": None
            if self.change is None
            else {"overrides": self.change.overrides, "world_size": self.change.world_size},
            "refusal": self.refusal() or None,
        }


def setup_from(res: Resolved, world_size: int) -> Setup:
    """The :class:`Setup` of a resolved run config on ``world_size`` GPUs (bf16 autocast unless
    ``train.dtype=float32``)."""
    cfg = res.cfg
    shape: Shape = model_shape(cfg.model)
    return Setup(
        shape=shape,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.optim.batch_size,
        grad_accum=cfg.optim.grad_accum,
        world_size=world_size,
        parallel=cfg.train.parallel,
        activation_checkpointing=cfg.train.activation_checkpointing,
        compute_bytes=4 if cfg.train.dtype == "float32" else 2,
        tokens=trained_tokens(res),
    )


def estimate(
    res: Resolved,
    *,
    gpu: str | GPU = "h100",
    world_size: int = 1,
    mfu: float | None = None,
    margin: float = MARGIN,
) -> Estimate:
    """Memory, speed and cost of ``res`` on ``world_size`` GPUs of kind ``gpu`` (a key of
    :data:`GPUS`, or a :class:`GPU`); ``mfu`` defaults to the measured compiled/eager value."""
    if isinstance(gpu, str) and gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1 (got {world_size})")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"MFU must lie in (0, 1] (got {mfu})")
    kind = GPUS[gpu] if isinstance(gpu, str) else gpu
    setup = setup_from(res, world_size)
    n, compiled = res.non_embedding_params, res.cfg.train.compile
    u = mfu if mfu is not None else default_mfu(n, compiled)
    note = ""
    if mfu is None:
        note = MFU_SOURCE
        if not measured_range(n):
            note += f". N = {_count(n)} lies outside the measured 9.4M–499M: " + (
                "tiny proxies are launch-bound, so the real speed is lower than this "
                "(measure with windtunnel bench)"
                if n < MEASURED_MFU[0][0]
                else "larger models usually reach a higher MFU, so this is conservative"
            )
    ok = fits(setup, kind, margin)
    return Estimate(
        model=res.cfg.model.name,
        setup=setup,
        gpu_key=gpu if isinstance(gpu, str) else gpu.name,
        gpu=kind,
        mfu=u,
        margin=margin,
        memory={mode: memory(setup, mode) for mode in ("ddp", "fsdp")},
        tokens_per_s=tokens_per_second(setup, kind, u),
        mfu_note=note,
        change=None if ok else suggest(setup, kind, margin),
    )


# -- the table -----------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 3600:,.0f} h ({seconds / 86400:.1f} days)"


ROWS = (
    ("parameters (fp32)", "parameters"),
    ("gradients (fp32)", "gradients"),
    ("AdamW moments (2 × fp32)", "optimizer"),
    ("weights, compute dtype (ddp cast, fsdp gathered)", "weights"),
    ("activations (fwd/bwd)", "activations"),
    ("logits and loss, fp32 (fwd/bwd)", "logits"),
    ("AdamW step temporaries (step)", "optimizer_step"),
    ("CUDA context, NCCL (fixed)", "runtime"),
    ("peak: states + max(fwd/bwd, step)", "peak"),
)


def table(e: Estimate) -> str:
    """The dry run's human-readable report."""
    s, g = e.setup, e.gpu
    ck = ", activation checkpointing" if s.activation_checkpointing else ""
    prec = "bf16 autocast" if s.compute_bytes == 2 else "fp32"
    star = {mode: mode + ("*" if mode == s.parallel else "") for mode in ("ddp", "fsdp")}
    lines = [
        f"{e.model}: {_count(total_params(s.shape))} params, seq {s.seq_len}, batch "
        f"{s.batch_size} sequences ({s.batch_size * s.seq_len:,} tokens/step), grad_accum "
        f"{s.grad_accum}, {s.world_size} × {g.name}, {prec}{ck}",
        f"memory per rank at micro-batch {s.micro_batch} × {s.seq_len} tokens (* train.parallel)",
        f"  {'':<48}{star['ddp']:>12}{star['fsdp']:>12}",
    ]
    for label, key in ROWS:
        ddp, fsdp = (_bytes(getattr(e.memory[mode], key)) for mode in ("ddp", "fsdp"))
        lines.append(f"  {label:<48}{ddp:>12}{fsdp:>12}")
    verdict = "fits" if e.fits else "DOES NOT FIT"
    lines.append(
        f"  {s.parallel} {verdict} in {_bytes(e.usable_bytes)} usable "
        f"({e.margin:.0%} of {_bytes(g.memory_bytes)})"
    )
    lines.append(
        f"speed: {s.world_size} × {g.peak_flops / 1e12:.0f} TFLOP/s ({g.name} bf16 dense, "
        f"datasheet) × MFU {e.mfu:.3f} / {flops_per_token(s):.3g} FLOP/token = "
        f"{e.tokens_per_s:,.0f} tokens/s"
    )
    lines.append(
        f"run: {_count(s.tokens)} tokens → {_duration(e.wall_seconds)} wall-clock, "
        f"{e.gpu_hours:,.{0 if e.gpu_hours >= 100 else 2}f} GPU-hours"
    )
    if e.mfu_note:
        lines.append(textwrap.fill(f"note: {e.mfu_note}", 100, subsequent_indent="  "))
    return "\n".join(lines)
