"""The planner: fitted laws → the full run's Hydra experiment config.

Given a fit file (written by ``windtunnel fit --out``) and a budget (FLOPs, parameters or tokens),
choose N and D from the compute-optimal allocation, a MiniCPM-shaped model for N (d_head 64,
d_ff = 2.5·d, depth from the proxy family), the batch size from the batch-size law at the
predicted loss, the base lr and width multiplier from μP, a WSD schedule with ~10% decay, the
predicted loss with its prediction interval (bootstrap parameters, lack of fit and seed noise: scaling/intervals.py), and GPU-hours for a named GPU at a stated MFU.

Every plan is checked against the ranges its fit file records (:mod:`windtunnel.scaling.plancheck`):
what the fit does not support is a typed warning in ``Plan.warnings`` (the YAML's header, the
JSON, the CLI's ``WARNING:`` lines, the tunnel's report), or a refusal
(:class:`~windtunnel.scaling.errors.PlanRefusedError`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from windtunnel.estimate import GPUS
from windtunnel.flops import Shape, d_ff_for, flops_per_token, non_embedding_params
from windtunnel.scaling.allocation import (
    compute_optimal,
    optimal_for_params,
    optimal_for_tokens,
)
from windtunnel.scaling.batch_lr import MINICPM_BATCH_LAW
from windtunnel.scaling.bootstrap import BootstrapResult
from windtunnel.scaling.errors import FitFileError, InputError, PlanRefusedError
from windtunnel.scaling.laws import DataModelLaw
from windtunnel.scaling.plancheck import (
    PlanWarning,
    check_batch_clamp,
    check_batch_law,
    check_extrapolation,
    check_fit_file,
    check_intervals,
    check_steps,
    check_tokens_per_param,
    refusals,
)

GPU_PEAK_BF16: dict[str, float] = {name: gpu.peak_flops for name, gpu in GPUS.items()}
"""Dense bf16 peak FLOP/s per GPU (datasheets, no sparsity), from :data:`windtunnel.estimate.GPUS`."""

D_HEAD = 64
MAX_WIDTH = 32768
MAX_DEPTH_FACTOR = 4.0
"""A planned model of the widest width deeper than this many times the family's depth there is
refused: beyond ~2·10^13 parameters no MiniCPM-shaped model exists."""
DIM_MODEL_BASE = 256
MINICPM_BASE_LR = 0.01
MINICPM_VOCAB = 122_753

# MiniCPM's proxy family and released models: (label, d_model, n_layers, n_heads, n_kv_heads)
FAMILY: tuple[tuple[str, int, int, int, int], ...] = (
    ("9M", 320, 8, 5, 5),
    ("30M", 512, 12, 8, 8),
    ("70M", 640, 14, 10, 10),
    ("0.1B", 768, 16, 12, 12),
    ("0.17B", 896, 18, 14, 14),
    ("0.2B", 1024, 20, 16, 16),
    ("0.5B", 1344, 24, 21, 21),
    ("1.2B", 1536, 52, 24, 8),
    ("2.4B", 2304, 40, 36, 36),
)


def _shape(d: int, L: int, nq: int, nkv: int, vocab: int, d_head: int = D_HEAD) -> Shape:
    return Shape(
        n_layers=L,
        d_model=d,
        n_heads=nq,
        n_kv_heads=nkv,
        d_head=d_head,
        d_ff=d_ff_for(d),
        vocab_size=vocab,
    )


def _family_depth(d: float) -> float:
    """Depth of the MiniCPM family at width d (log–log interpolation of the MHA members)."""
    pts = [(math.log(w), math.log(L)) for _, w, L, q, kv in FAMILY if q == kv]
    xs, ys = zip(*pts)
    x = math.log(d)
    if x <= xs[0]:
        s = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return math.exp(ys[0] + s * (x - xs[0]))
    if x >= xs[-1]:
        s = (ys[-1] - ys[-3]) / (xs[-1] - xs[-3])
        return math.exp(ys[-1] + s * (x - xs[-1]))
    return math.exp(float(np.interp(x, xs, ys)))


def choose_shape(
    N: float, *, vocab_size: int = MINICPM_VOCAB, snap: float = 0.1, d_head: int = D_HEAD
) -> tuple[str, Shape]:
    """A MiniCPM-shaped decoder with ≈N non-embedding parameters.

    A family member within ``snap`` (relative) of N is used as is (the 1.2B keeps its GQA);
    otherwise the width (a multiple of ``d_head``, 64 like MiniCPM's unless the proxies' heads
    are smaller) whose exact-N depth is closest to the family's depth at that width, with the
    depth rounded to hit N.
    """
    if not N > 0:
        raise InputError(f"target parameter count must be positive, got {N}")
    best = None
    for label, d, L, q, kv in FAMILY if d_head == D_HEAD else ():
        s = _shape(d, L, q, kv, vocab_size)
        err = abs(math.log(non_embedding_params(s) / N))
        if err <= math.log1p(snap) and (best is None or err < best[0]):
            best = (err, f"minicpm-{label}", s)
    if best is not None:
        return best[1], best[2]
    cands = []
    h = d_head

    def shape(d: int, L: int) -> Shape:
        return _shape(d, L, d // h, d // h, vocab_size, h)

    widest = MAX_WIDTH // h * h
    for d in range(h, widest + 1, h):
        per_layer = non_embedding_params(shape(d, 1)) - d
        L_exact = (N - d) / per_layer
        if L_exact < 1:
            continue
        L = max(1, round(L_exact))
        n_err = abs(non_embedding_params(shape(d, L)) / N - 1)
        # prefer shapes within 3% of N, else the nearest 10% band of N (tiny models, where
        # whole layers are coarse steps), then the family's depth-to-width ratio
        band = round(n_err, 1) if n_err > 0.03 else 0.0
        cands.append((n_err > 0.03, band, abs(math.log(L_exact / _family_depth(d))), n_err, d, L))
    if not cands:
        raise InputError(f"no MiniCPM-shaped model has {N:.3g} non-embedding parameters")
    *_, d, L = min(cands)
    too_deep = L / _family_depth(d)
    if d == widest and too_deep > MAX_DEPTH_FACTOR:
        raise InputError(
            f"no MiniCPM-shaped model has {N:.3g} non-embedding parameters: at the widest width "
            f"({d}) it would need {L} layers, {too_deep:.0f}x the family's depth; plan a smaller "
            "model (--params, --budget-flops)"
        )
    s = shape(d, L)
    n = non_embedding_params(s)
    unit, scale = next((u, x) for u, x in (("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)) if n >= x)
    return f"planned-{n / scale:.3g}{unit}", s


@dataclass
class Plan:
    """Everything the planner decided, with the reasons in numbers."""

    name: str
    shape: Shape
    N_target: float
    N: int
    D: int
    C_6ND: float
    C_exact: float
    loss: float
    loss_interval: tuple[float, float] | None
    tokens_per_param: float
    batch_tokens: float
    batch_size: int
    seq_len: int
    lr: float
    width_multiplier: float
    gpu: str
    mfu: float
    gpu_hours: float
    target: str
    notes: list[str] = field(default_factory=list)
    mup: dict[str, float] = field(default_factory=dict)
    """μP hyperparameters found by the search (``scale_emb``, ``init_std``, ``scale_depth``)."""
    warnings: list[PlanWarning] = field(default_factory=list)
    """What the plan does beyond what the fit supports (:mod:`windtunnel.scaling.plancheck`)."""
    steps: int = 0
    """Optimizer steps: ``D // (batch_size · seq_len)``."""
    tokens_per_param_interval: tuple[float, float] | None = None
    """Bootstrap interval of the compute-optimal D/N at the plan's compute (None: no bootstrap,
    or N and D were both given)."""
    batch_source: str = "the batch-size law"
    """Where the batch came from (the fit's batch-size law, MiniCPM's, or the caller)."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """The proxies' lr schedule (the law describes runs trained with it); empty: MiniCPM's WSD
    with an exponential decay over the last 10%."""

    @property
    def refused(self) -> bool:
        return bool(refusals(self.warnings))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an interval end that is not finite (the bootstrap's laws overflow there)
        is None, i.e. unbounded."""
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        for k in ("loss_interval", "tokens_per_param_interval"):
            if d[k] is not None:
                d[k] = [float(x) if math.isfinite(x) else None for x in d[k]]
        return d

    def hydra_config(self) -> dict[str, Any]:
        """The experiment config (schema field names of :mod:`windtunnel.config`)."""
        s = self.shape
        steps = max(1, self.D // (self.batch_size * self.seq_len))
        return {
            "stage": "full",
            "model": {
                "name": self.name,
                "n_layers": s.n_layers,
                "d_model": s.d_model,
                "n_heads": s.n_heads,
                "n_kv_heads": s.n_kv_heads,
                "d_head": s.d_head,
                "d_ff": s.d_ff,
                "vocab_size": s.vocab_size,
                "max_seq_len": self.seq_len,
                "tie_embeddings": True,
                "mup": True,
                **self.mup,
                # an int in the schema (a state file's round trip makes every μP value a float)
                "dim_model_base": int(self.mup.get("dim_model_base", DIM_MODEL_BASE)),
            },
            "data": {"seq_len": self.seq_len},
            "optim": {"lr": self.lr, "batch_size": self.batch_size},
            "schedule": dict(self.schedule)
            or {
                "kind": "wsd",
                "warmup_tokens": int(min(0.01 * self.D, 2000 * self.batch_size * self.seq_len))
                if steps > 100
                else 0,
                "decay": "exp",
                "decay_fraction": 0.1,
            },
            "train": {"tokens": int(self.D), "branch_tokens": []},
        }

    def to_yaml(self) -> str:
        import yaml

        lo_hi = (
            f"[{self.loss_interval[0]:.4f}, {self.loss_interval[1]:.4f}]"
            if self.loss_interval
            else "n/a (no bootstrap in the fit file)"
        )
        first = [f"# {w.tagged()}" for w in self.warnings if w.action == "refuse"]
        head = [
            "# @package _global_",
            *first,
            f"# Full run planned by `windtunnel plan` from a {self.target} fit.",
            f"# N (non-embedding) = {self.N:,} (target {self.N_target:.4g}),"
            f" D = {self.D:,} tokens ({self.tokens_per_param:.1f} tokens/param)",
            f"# C = 6ND = {self.C_6ND:.3e} FLOPs; exact count {self.C_exact:.3e}",
            f"# predicted final {self.target}: {self.loss:.4f}, interval {lo_hi}",
            f"# batch: {self.batch_tokens:.3g} tokens/step from {self.batch_source}"
            f" → {self.batch_size} × {self.seq_len}",
            f"# μP: base lr {self.lr:g}, width multiplier m = {self.width_multiplier:g}"
            " (hidden matrices get lr/m in the trainer)",
            f"# cost: {self.gpu_hours:,.0f} GPU-hours on {self.gpu.upper()} at MFU {self.mfu:g}",
            *[f"# note: {n}" for n in self.notes],
            *[f"# {w.tagged()}" for w in self.warnings if w.action != "refuse"],
        ]
        body = yaml.safe_dump(self.hydra_config(), sort_keys=False, default_flow_style=False)
        return "\n".join(head) + "\n" + body


def load_fit_file(path: str | Path) -> dict[str, Any]:
    """A fit file (``fit.json`` or its folder), checked against its version's model
    (:data:`~windtunnel.scaling.analyze.FIT_FILE_MODELS`); a version-1 file gets the fitted
    ranges from the ``points.csv`` next to it when there is one (else the plan warns that it
    cannot check)."""
    from windtunnel.scaling.analyze import FIT_FILE_KIND, FIT_FILE_MODELS
    from windtunnel.schema import check_versioned, read_json

    p = Path(path)
    if p.is_dir():
        p = p / "fit.json"
    if not p.exists():
        raise InputError(f"no fit file at {p}; run `windtunnel fit --out DIR` first")
    fix = "refit with `windtunnel fit --out DIR` (or use the windtunnel that wrote it)"
    data = read_json(p, what="fit file", fix=fix, error=FitFileError)
    if not isinstance(data, dict) or data.get("kind") != FIT_FILE_KIND:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise FitFileError(p, "kind", f"{kind!r}: not a windtunnel fit file", fix)
    check_versioned(data, FIT_FILE_MODELS, path=p, what="fit file", fix=fix, error=FitFileError)
    span = data.get("data_range") or {}
    points = p.parent / "points.csv"
    if not span.get("tokens_per_param") and points.is_file():
        import pandas as pd

        from windtunnel.scaling.analyze import data_range

        df = pd.read_csv(points)
        target = str((data.get("fit") or {}).get("target", "loss"))
        if {"N", "D"} <= set(df.columns):
            data["data_range"] = {**data_range(df, target=target), **span}
    return data


def make_plan(
    fit: dict[str, Any],
    *,
    budget_flops: float | None = None,
    params: float | None = None,
    tokens: float | None = None,
    gpu: str = "h100",
    mfu: float = 0.4,
    seq_len: int = 4096,
    vocab_size: int = MINICPM_VOCAB,
    lr: float | None = None,
    batch_law: dict[str, float] | None = None,
    batch_tokens: float | None = None,
    name: str | None = None,
    mup: dict[str, float] | None = None,
    d_head: int = D_HEAD,
    schedule: dict[str, Any] | None = None,
    refuse: bool = True,
) -> Plan:
    """Plan the full run from a loaded fit file (see :func:`load_fit_file`).

    ``batch_tokens`` sets the batch (tokens per step) instead of the batch-size law; ``mup``
    holds the proxies' μP settings (``dim_model_base`` included: the width multiplier is taken
    from it), ``d_head`` their head size (the planned model's widths are multiples of it) and
    ``schedule`` their lr schedule (the run the law describes). The plan is checked against the fit's ranges (:mod:`~windtunnel.scaling.plancheck`); a plan the checks
    refuse raises :class:`PlanRefusedError`, or with ``refuse=False`` is returned with the
    refusal among its warnings (``Plan.refused``), for a report to show.
    """
    given = [x is not None for x in (budget_flops, params, tokens)]
    if (budget_flops is not None and any(given[1:])) or not any(given):
        raise InputError(
            "give one of --budget-flops, --params or --tokens (or --params with --tokens)"
        )
    if gpu.lower() not in GPU_PEAK_BF16:
        raise InputError(f"unknown GPU {gpu!r}; known: {', '.join(GPU_PEAK_BF16)}")
    if not 0 < mfu <= 1:
        raise InputError(f"MFU must be in (0, 1], got {mfu}")
    if batch_tokens is not None and not batch_tokens > 0:
        raise InputError(f"--batch-tokens must be positive, got {batch_tokens}")
    f = fit["fit"]
    law = DataModelLaw(E=f["E"], A=f["A"], B=f["B"], alpha=f["alpha"], beta=f["beta"])
    notes: list[str] = []
    try:
        if params is not None and tokens is not None:
            N_t, D_t = float(params), float(tokens)
        elif budget_flops is not None:
            al = compute_optimal(law, float(budget_flops))
            N_t, D_t = al.N_opt, al.D_opt
        elif params is not None:
            al = optimal_for_params(law, float(params))
            N_t, D_t = float(params), al.D_opt
        else:
            assert tokens is not None  # one of the three is given (checked above)
            al = optimal_for_tokens(law, float(tokens))
            N_t, D_t = al.N_opt, float(tokens)
    except (OverflowError, ZeroDivisionError) as e:
        raise PlanRefusedError(
            f"the fitted law's allocation overflows at this budget ({e}); plan a budget nearer "
            "the fitted compute"
        ) from None
    label, shape = choose_shape(N_t, vocab_size=vocab_size, d_head=d_head)
    N = non_embedding_params(shape)
    if budget_flops is not None:
        D_t = float(budget_flops) / (6.0 * N)  # spend the budget on the shape actually chosen
    if not D_t >= 1 or not math.isfinite(D_t):
        raise PlanRefusedError(
            f"the plan trains {D_t:.3g} tokens (N = {N:,}): no run; raise the budget "
            "(--budget-flops, --tokens)"
        )
    D = int(round(D_t))
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, not warned about
        loss = float(law.predict(N, D))
    if not math.isfinite(loss):
        raise PlanRefusedError(
            f"the fit predicts a {fit['fit'].get('target', 'loss')} of {loss} at N = {N:.3g}, "
            f"D = {D:.3g}: the fit file's law (E, A, B, alpha, beta) is not usable; refit"
        )
    interval = tpp_interval = None
    if fit.get("bootstrap"):
        from windtunnel.scaling.intervals import fit_file_interval

        boot = BootstrapResult.from_dict(fit["bootstrap"])
        # the run's loss, not only the law's: parameters, lack of fit and seed noise together
        pi = fit_file_interval(fit, N, D, level=boot.level)
        interval = (pi.lo, pi.hi)
        if params is None or tokens is None:  # the allocation chose N or D
            tpp_interval = boot.interval(boot.derived(6.0 * N * D)["tokens_per_param"])
    warnings = check_fit_file(fit)
    warnings += check_extrapolation(N, D, fit.get("data_range"))
    warnings += check_tokens_per_param(N, D, fit.get("data_range"))
    warnings += check_intervals(loss, interval, tpp_interval)
    batch_source = "the batch-size law"
    if batch_tokens is not None:
        bs_tokens = float(batch_tokens)
        batch_source = "the caller (--batch-tokens)"
        notes.append(f"batch size set by the caller ({bs_tokens:.3g} tokens per step)")
    else:
        bl = batch_law or fit.get("batch_size_law")
        if not bl:
            bl = MINICPM_BATCH_LAW
            batch_source = "MiniCPM's batch-size law"
            notes.append(
                "batch size from MiniCPM's law 1.21e9/L^6.24 (no batch-size law in the fit)"
            )
            if fit["fit"].get("target", "loss") != "loss":
                notes.append(
                    f"MiniCPM's batch-size law is in nats of loss but the fit's target is "
                    f"{fit['fit'].get('target')}: fit a batch-size law on the same quantity"
                )
        bs_tokens = float(bl["k"] / loss ** bl["gamma"])
        if not math.isfinite(bs_tokens):
            raise PlanRefusedError(
                f"the batch-size law {bl['k']:.3g}/L^{bl['gamma']:.3g} gives {bs_tokens} tokens "
                "per step; set --batch-tokens or a batch-size law with a finite value"
            )
        warnings += check_batch_law(loss, bl)
    warnings += check_batch_clamp(bs_tokens, seq_len)
    batch_size = max(1, int(round(bs_tokens / seq_len)))
    warnings += check_steps(D, batch_size, seq_len)
    warnings.sort(key=lambda w: ("refuse", "clamp", "warn").index(w.action))  # stable
    refused = refusals(warnings)
    if refuse and refused:
        raise PlanRefusedError("; ".join(w.line() for w in refused))
    base_lr = float(lr if lr is not None else fit.get("lr") or MINICPM_BASE_LR)
    C_exact = float(flops_per_token(shape, seq_len)) * float(D)
    peak = GPU_PEAK_BF16[gpu.lower()]
    if not math.isfinite(C_exact / (peak * mfu)):
        raise PlanRefusedError(
            f"the plan's compute ({C_exact:.3g} FLOPs at MFU {mfu:g}) is not a finite number of "
            "GPU-hours; plan a smaller budget"
        )
    return Plan(
        name=name or label,
        shape=shape,
        N_target=float(N_t),
        N=int(N),
        D=D,
        C_6ND=6.0 * N * D,
        C_exact=C_exact,
        loss=loss,
        loss_interval=interval,
        tokens_per_param=D / N,
        batch_tokens=bs_tokens,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=base_lr,
        width_multiplier=shape.d_model / float((mup or {}).get("dim_model_base", DIM_MODEL_BASE)),
        gpu=gpu.lower(),
        mfu=mfu,
        gpu_hours=C_exact / (peak * mfu) / 3600.0,
        target=str(fit["fit"].get("target", "loss")),
        notes=notes,
        mup={k: int(v) if k == "dim_model_base" else float(v) for k, v in (mup or {}).items()},
        warnings=warnings,
        steps=int(D // (batch_size * seq_len)),
        tokens_per_param_interval=tpp_interval,
        batch_source=batch_source,
        schedule=dict(schedule or {}),
    )
