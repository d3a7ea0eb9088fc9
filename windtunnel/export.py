"""Export (DESIGN §8): a trained proxy as a plain Hugging Face Llama; a model as a MiniCPM config.

MiniCPM's μP multipliers are linear, so a trained :class:`~windtunnel.model.Decoder` *is* a
Llama once they are folded into the weights (:func:`llama_state_dict`):

    embed_tokens  = scale_emb · Emb                      x0 = scale_emb · Emb(tokens)
    o_proj        = (scale_depth / √L) · wo              x += (scale_depth/√L) · attn(norm(x))
    down_proj     = (scale_depth / √L) · w2              x += (scale_depth/√L) · mlp(norm(x))
    lm_head       = W_out / m   (untied)                 logits = W_out · (norm(x_L) / m)

and RoPE is made to pair the same coordinates: windtunnel rotates consecutive pairs
``(2i, 2i+1)``, Hugging Face's Llama rotates halves ``(i, i + d_head/2)``, so the rows of each
query and key head are reordered ``[0, 2, 4, …, 1, 3, 5, …]`` (q·k is unchanged because q and k
get the same order). The result loads with plain ``transformers`` (``LlamaForCausalLM``, no remote
code), and so with everything that reads Llama folders.

:func:`export_hf` writes that folder from a run folder's checkpoint (a DCP folder written by any
number of ranks, or a legacy ``.pt``)::

    OUT/config.json              LlamaConfig (tie_word_embeddings false: the head carries 1/m)
    OUT/model.safetensors        the folded weights
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json   the run's tokenizer
    OUT/windtunnel.json          where it came from: run, checkpoint, step, config, the factors

:func:`minicpm_config` is MiniCPM's own ``config.json`` (``scale_emb``, ``dim_model_base``,
``scale_depth`` kept as multipliers; loading it needs OpenBMB's ``modeling_minicpm.py``) for a
model config: a planned full run's (``windtunnel plan --out``) or a run's.

Nothing here imports ``transformers``; writing weights needs ``safetensors`` (the ``export``
extra).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from windtunnel import checkpoint
from windtunnel.config import ModelConfig, Point, RunConfig, from_dict, resolve, resolve_model
from windtunnel.data import EOT, DataError, PreparedCorpus, corpus_root
from windtunnel.model import Decoder

FORMATS = ("hf", "minicpm-config")
"""What ``windtunnel export --to`` writes."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INSTALL_HINT = "pip install 'windtunnel[export]'"


class ExportError(ValueError):
    """Nothing sensible to export (no checkpoint, unfinished segment, OUT in the way, ...)."""


# ---------------------------------------------------------------------------------------------
# the run folder: its config and which checkpoint is its finished model
# ---------------------------------------------------------------------------------------------


def load_run_config(run_dir: Path) -> RunConfig:
    """The run config a run folder was trained with (its ``config.json``, model resolved)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run folder: it has no config.json")
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return from_dict(RunConfig, {k: v for k, v in data.items() if k in names})


def segments(run_dir: Path) -> list[str]:
    """Names of the segments that have a checkpoint in ``run_dir/ckpt`` (sorted)."""
    root = run_dir / "ckpt"
    if not root.is_dir():
        return []
    names = set()
    for entry in root.iterdir():
        name = entry.name.removesuffix(".pt").removesuffix(".old")
        if checkpoint.exists(root / name):
            names.add(name)
    return sorted(names)


def _finished_points(cfg: RunConfig) -> dict[str, Point]:
    """Segment name → the point it finishes (``main`` or ``branch-<D>``)."""
    res = resolve(cfg)
    if not res.branching:
        return {"main": res.points[0]}
    return {f"branch-{p.tokens}": p for p in res.points}


def find_checkpoint(run_dir: Path, cfg: RunConfig, point: int | None = None) -> Path:
    """The checkpoint of the run's finished model: ``main``, or the branch ending at ``point``
    tokens (default: the largest branch with a checkpoint). It must sit at its segment's last
    step: an unfinished one is exported only when named (``--checkpoint``)."""
    finished, have = _finished_points(cfg), segments(run_dir)
    done = [s for s in finished if s in have]
    if point is not None:
        name = f"branch-{point}"
        if name not in finished:
            points = ", ".join(str(p.tokens) for p in finished.values())
            raise ExportError(f"{run_dir} has no point at {point} tokens; its points: {points}")
    elif not done:
        raise ExportError(
            f"{run_dir} has no checkpoint of a finished model (checkpoints: "
            f"{', '.join(have) or 'none'}): finish the run, or name one with --checkpoint PATH"
        )
    else:
        name = max(done, key=lambda s: finished[s].tokens)
    path = run_dir / "ckpt" / name
    if name not in have:
        raise ExportError(
            f"{run_dir} has no checkpoint {name} yet (checkpoints: {', '.join(have)})"
        )
    step, last = int(checkpoint.read_meta(path)["step"]), finished[name].total_steps
    if step != last:
        raise ExportError(
            f"{path} is at step {step} of {last}: that segment has not finished (or was "
            "trained by a windtunnel that did not checkpoint a segment's last step); finish "
            f"the run, or export this state with --checkpoint {path}"
        )
    return path


# ---------------------------------------------------------------------------------------------
# the conversion (pure: a Decoder in, tensors and dicts out)
# ---------------------------------------------------------------------------------------------


def halves_order(d_head: int) -> torch.Tensor:
    """Row order that turns consecutive RoPE pairs (2i, 2i+1) into halves (i, i + d_head/2)."""
    return torch.arange(d_head).view(d_head // 2, 2).t().reshape(-1)


def _rope_rows(w: torch.Tensor, n_heads: int, d_head: int) -> torch.Tensor:
    """``w`` [n_heads·d_head, d] with each head's rows in :func:`halves_order`."""
    return w.view(n_heads, d_head, -1)[:, halves_order(d_head)].reshape(n_heads * d_head, -1)


def fold_factors(m: ModelConfig) -> dict[str, float]:
    """The μP multipliers that :func:`llama_state_dict` folds into the weights."""
    width = m.d_model / m.dim_model_base if m.mup else 1.0
    return {
        "embedding": m.scale_emb,
        "residual": m.scale_depth / math.sqrt(m.n_layers),
        "lm_head": 1.0 / width,
    }


def llama_state_dict(model: Decoder, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights of ``model`` as ``LlamaForCausalLM``'s, multipliers folded in (each product
    taken in float64 and rounded once to ``dtype``)."""
    cfg = model.cfg
    hq, hkv, dh, d_ff = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_ff
    f = fold_factors(cfg)
    sd: dict[str, torch.Tensor] = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def w(key: str, factor: float = 1.0) -> torch.Tensor:
        t = sd[key]
        return t.double().mul(factor).to(dtype) if factor != 1.0 else t.to(dtype)

    out = {
        "model.embed_tokens.weight": w("embed.weight", f["embedding"]),
        "model.norm.weight": w("norm.weight"),
        "lm_head.weight": w(
            "lm_head.weight" if "lm_head.weight" in sd else "embed.weight", f["lm_head"]
        ),
    }
    for i in range(cfg.n_layers):
        b, o = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = torch.split(w(b + "attn.wqkv.weight"), [hq * dh, hkv * dh, hkv * dh])
        gate, up = torch.split(w(b + "mlp.w13.weight"), d_ff)
        out |= {
            o + "input_layernorm.weight": w(b + "attn_norm.weight"),
            o + "self_attn.q_proj.weight": _rope_rows(q, hq, dh),
            o + "self_attn.k_proj.weight": _rope_rows(k, hkv, dh),
            o + "self_attn.v_proj.weight": v,
            o + "self_attn.o_proj.weight": w(b + "attn.wo.weight", f["residual"]),
            o + "post_attention_layernorm.weight": w(b + "mlp_norm.weight"),
            o + "mlp.gate_proj.weight": gate,
            o + "mlp.up_proj.weight": up,
            o + "mlp.down_proj.weight": w(b + "mlp.w2.weight", f["residual"]),
        }
    # each tensor its own contiguous storage: safetensors refuses views sharing memory
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def llama_config(
    m: ModelConfig, *, eot_id: int | None = None, dtype: str = "float32"
) -> dict[str, Any]:
    """``config.json`` of the exported ``LlamaForCausalLM`` (read by transformers 4.46 to 5.x:
    ``rope_theta`` for 4.x, ``rope_parameters`` for 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "head_dim": m.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": min(m.init_std, 1.0),
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def minicpm_config(
    m: ModelConfig, *, eot_id: int | None = None, dtype: str = "bfloat16"
) -> dict[str, Any]:
    """MiniCPM's ``config.json`` for a model config: the μP multipliers stay multipliers
    (``scale_emb``, ``dim_model_base``, ``scale_depth``), as OpenBMB's modeling code applies
    them. Standard parametrization (``mup`` off) is ``dim_model_base = hidden_size``."""
    m = resolve_model(m)
    if m.n_heads * m.d_head != m.d_model:
        raise ExportError(
            f"MiniCPM derives head_dim = hidden_size / heads, but this model has d_head "
            f"{m.d_head} × {m.n_heads} heads != d_model {m.d_model}"
        )
    return {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "intermediate_size": m.d_ff,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len,
        "hidden_act": "silu",
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "scale_emb": m.scale_emb,
        "dim_model_base": m.dim_model_base if m.mup else m.d_model,
        "scale_depth": m.scale_depth,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": dtype,
    }


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


@contextmanager
def _staged(out: Path, *, force: bool, keep: Path | None = None) -> Iterator[Path]:
    """Write into a fresh ``OUT.partial``, renamed to ``OUT`` when the block succeeds (removed
    when it fails). An OUT that holds something is replaced only with ``force``, and never
    when it is (or holds) ``keep``, the run being exported."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty: choose another folder, or --force")
        if keep is not None and out.resolve() in (keep.resolve(), *keep.resolve().parents):
            raise ExportError(f"{out} holds the run being exported: choose another folder")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_tokenizer(cfg: RunConfig) -> PreparedCorpus | None:
    """The prepared corpus the run was trained on (None when it was pre-tokenized)."""
    if all(d.kind == "tokens" for d in cfg.data.domains):
        return None
    try:
        root = corpus_root(cfg.data)
    except DataError as e:
        raise ExportError(f"cannot find the run's corpus ({e}); pass --tokenizer PATH") from None
    if not (root / "meta.json").is_file():
        raise ExportError(
            f"the run's corpus is not prepared at {root} (was it cleaned, or is this another "
            "working directory or tokenizers version?): run `windtunnel prepare` with the run's "
            "data settings, pass --tokenizer PATH (a tokenizer.json or a prepared corpus), or "
            "--no-tokenizer"
        )
    return PreparedCorpus.load(root)


def write_tokenizer(tokenizer_json: Path, out: Path, *, max_len: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer`` opens as a
    ``PreTrainedTokenizerFast`` giving windtunnel's ids (``<|endoftext|>`` inside text stays
    text, as in training; no BOS is added)."""
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    has_eot = _token_id(tokenizer_json, EOT) is not None
    special = {"bos_token": EOT, "eos_token": EOT} if has_eot else {}
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": max_len,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,
        },
    )
    _write_json(out / "special_tokens_map.json", special)


def _tokenizer_file(path: Path) -> Path:
    """A ``tokenizer.json``, or the one of a prepared corpus folder."""
    if path.is_dir():
        found = PreparedCorpus.load(path).tokenizer_path
        if found is None:
            raise ExportError(f"{path} is a pre-tokenized corpus: it has no tokenizer")
        return found
    if not path.is_file():
        raise ExportError(f"no tokenizer at {path}")
    return path


def export_hf(
    run_dir: Path,
    out: Path,
    *,
    point: int | None = None,
    checkpoint_path: Path | None = None,
    tokenizer: Path | bool = True,
    dtype: str = "float32",
    force: bool = False,
) -> dict[str, Any]:
    """Write ``out`` as a Hugging Face ``LlamaForCausalLM`` folder of the run's finished model
    (or of ``point``, or of any ``checkpoint_path``); ``tokenizer``: True for the run's own,
    a path to a ``tokenizer.json`` or prepared corpus, False for none. Returns a summary."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    cfg = load_run_config(run_dir)
    mcfg = resolve_model(cfg.model)
    if checkpoint_path is not None:
        if not checkpoint.exists(checkpoint_path):
            raise ExportError(f"no checkpoint at {checkpoint_path}")
        ckpt = checkpoint_path
    else:
        ckpt = find_checkpoint(run_dir, cfg, point)
    corpus, tok_file = None, None
    if tokenizer is True and (run_dir / "tokenizer.json").is_file():
        tok_file = run_dir / "tokenizer.json"  # the trainer keeps a copy in the run folder
    elif tokenizer is True:
        corpus = run_tokenizer(cfg)
        tok_file = corpus.tokenizer_path if corpus is not None else None
    elif tokenizer is not False:
        tok_file = _tokenizer_file(Path(tokenizer))
    if tok_file is not None:
        n = _vocab_size(tok_file)
        if n != mcfg.vocab_size:
            raise ExportError(
                f"the tokenizer {tok_file} has {n} tokens but the model {mcfg.vocab_size}: "
                "it is not the run's tokenizer"
            )

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError(f"writing weights needs safetensors: {INSTALL_HINT}") from None
    model = Decoder(mcfg)
    meta = checkpoint.load_model(ckpt, model)
    step = int(meta.get("step", -1))
    eot = _eot_id(tok_file, corpus)
    summary = {
        "out": str(out),
        "to": "hf",
        "architecture": "LlamaForCausalLM",
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint.resolve(ckpt)),
        "step": step,
        "tokens": step * cfg.optim.batch_size * cfg.data.seq_len,
        "dtype": dtype,
        "tokenizer": str(tok_file) if tok_file is not None else None,
        "folded": fold_factors(mcfg),
    }
    with _staged(out, force=force, keep=run_dir) as tmp:
        weights = llama_state_dict(model, DTYPES[dtype])
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # 4.x
        _write_json(tmp / "config.json", llama_config(mcfg, eot_id=eot, dtype=dtype))
        if eot is not None:
            ids = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
            _write_json(tmp / "generation_config.json", ids)
        if tok_file is not None:
            write_tokenizer(tok_file, tmp, max_len=mcfg.max_seq_len)
        _write_json(tmp / "windtunnel.json", {**summary, "model": dataclasses.asdict(mcfg)})
    return summary


def _vocab_size(tokenizer_json: Path) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(tokenizer_json)).get_vocab_size())


def _token_id(tokenizer_json: Path, token: str) -> int | None:
    from tokenizers import Tokenizer

    found = Tokenizer.from_file(str(tokenizer_json)).token_to_id(token)
    return None if found is None else int(found)


def _eot_id(tok_file: Path | None, corpus: PreparedCorpus | None) -> int | None:
    if corpus is not None and corpus.eot_id is not None:
        return corpus.eot_id
    return _token_id(tok_file, EOT) if tok_file is not None else None


def model_config_of(source: Path) -> ModelConfig:
    """The model section of a run folder's ``config.json``, of a run config (JSON), or of a
    planned experiment (the YAML ``windtunnel plan --out`` writes)."""
    path = source / "config.json" if source.is_dir() else source
    if not path.is_file():
        raise ExportError(f"no run folder, run config or plan at {source}")
    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ExportError(f"{path} is not valid JSON/YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ExportError(f"{path} has no model section")
    try:
        return from_dict(ModelConfig, data["model"], "model.")
    except (TypeError, ValueError) as e:  # an unknown key, a mistyped value: name the file
        raise ExportError(f"{path}: {e}") from None


def export_minicpm_config(source: Path, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Write ``out/config.json``, MiniCPM's config of the model in ``source`` (a run folder, a
    run config or a planned experiment YAML). Returns a summary."""
    m = model_config_of(source)
    config = minicpm_config(m)
    with _staged(out, force=force, keep=source) as tmp:
        _write_json(tmp / "config.json", config)
    return {"out": str(out), "to": "minicpm-config", "source": str(source), "config": config}
