"""Building a prepared corpus: split into blocks, train the tokenizer, write memmaps, cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from windtunnel.config import DataConfig
from windtunnel.data.corpus import EOT, FORMAT_VERSION, CorpusMeta, DataError, PreparedCorpus
from windtunnel.data.sources import Source, domains_of, load_tokens, read_docs, resolve, validate
from windtunnel.files import lock
from windtunnel.schema import written

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_VAL_BLOCKS = 16  # aim for this many validation blocks per domain
_BLOCK_CHARS = (512, 65536)
_BLOCK_TOKENS = (128, 16384)
log = logging.getLogger(__name__)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _pick_val(n_blocks: int, cfg: DataConfig, name: str) -> np.ndarray:
    n_val = max(1, round(cfg.val_fraction * n_blocks))
    if n_val >= n_blocks:
        raise DataError(
            f"domain {name!r} is too small to split ({n_blocks} block(s)): add text, or lower "
            "data.val_fraction"
        )
    is_val = np.zeros(n_blocks, bool)
    is_val[_rng(cfg.seed, name).choice(n_blocks, n_val, replace=False)] = True
    return is_val


def _blocks(docs: list[str], frac: float) -> tuple[list[tuple[str, bool]], list[int]]:
    """Pieces (text, ends a document) of at most ~target chars, and block start indices."""
    lo, hi = _BLOCK_CHARS
    target = min(hi, max(lo, int(sum(map(len, docs)) * frac / _VAL_BLOCKS)))
    pieces: list[tuple[str, bool]] = []
    starts, size = [], 0
    for doc in docs:
        i = 0
        while i < len(doc):
            j = (
                len(doc)
                if len(doc) - i <= target
                else doc.rfind("\n", i + target // 2, i + target) + 1
            )
            j = j if j > i else i + target
            if not starts or size + j - i > target:
                starts.append(len(pieces))
                size = 0
            pieces.append((doc[i:j], j >= len(doc)))
            size += j - i
            i = j
    return pieces, starts


# ----------------------------------------------------------------------------- building


def _show(progress: bool) -> bool:
    """Bars on a terminal only: in log files (CI, SLURM) they would be one endless line."""
    return progress and not os.environ.get("WINDTUNNEL_NO_PROGRESS") and sys.stderr.isatty()


def _train_tokenizer(texts: Iterable[str], cfg: DataConfig, progress: bool) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer)
    tok.encode_special_tokens = True  # "<|endoftext|>" inside a document is plain text
    if tok.get_vocab_size() < cfg.vocab_size:
        log.warning(
            "the corpus only supports %d of the %d requested tokens; using %d",
            tok.get_vocab_size(),
            cfg.vocab_size,
            tok.get_vocab_size(),
        )
    return tok


def _dtype(vocab: int) -> str:
    return "uint16" if vocab <= 1 << 16 else "uint32"


def _write_text_split(
    tok: Tokenizer, pieces: list[tuple[str, bool]], eot: int, dtype: str, path: Path, bar: Any
) -> dict[str, Any]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    n_tok = n_bytes = 0
    with open(path, "wb") as fh:
        for k in range(0, len(pieces), 256):
            batch, ids = pieces[k : k + 256], []
            for (text, end), enc in zip(batch, encode([t for t, _ in batch])):
                ids += [*enc.ids, eot] if end else enc.ids
                n_bytes += len(text.encode("utf-8"))
                bar.update(len(text))
            fh.write(np.array(ids, dtype=dtype).tobytes())
            n_tok += len(ids)
    return {"path": path.name, "tokens": n_tok, "bytes": n_bytes}


def _build_text(cfg: DataConfig, sources: list[Source], tmp: Path, show: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    splits = []
    with tqdm(
        total=sum(len(s.files) for s in sources), desc="read", unit="file", disable=not show
    ) as bar:
        for src in sources:
            docs = read_docs(src, bar)
            if not docs:
                raise DataError(f"domain {src.dom.name!r} is empty: its files hold no text")
            pieces, starts = _blocks(docs, cfg.val_fraction)
            is_val = _pick_val(len(starts), cfg, src.dom.name)
            bounds = [*starts, len(pieces)]
            split = {
                s: [
                    p
                    for b in np.flatnonzero(is_val == (s == "val"))
                    for p in pieces[bounds[b] : bounds[b + 1]]
                ]
                for s in ("train", "val")
            }
            splits.append((src, split, len(docs), len(starts)))
    train_texts = (t for _, split, _, _ in splits for t, _ in split["train"])
    tok = _train_tokenizer(train_texts, cfg, show)
    tok.save(str(tmp / "tokenizer.json"))
    vocab, eot = tok.get_vocab_size(), tok.token_to_id(EOT)
    dtype, domains = _dtype(vocab), []
    total = sum(len(t) for _, split, _, _ in splits for s in split.values() for t, _ in s)
    with tqdm(total=total, desc="encode", unit="char", unit_scale=True, disable=not show) as bar:
        for src, split, n_docs, n_blocks in splits:
            info = {"name": src.dom.name, "kind": src.dom.kind, "weight": src.dom.weight}
            info |= {"documents": n_docs, "blocks": n_blocks}
            for s in ("train", "val"):
                info[s] = _write_text_split(
                    tok, split[s], eot, dtype, tmp / f"{src.dom.name}.{s}.bin", bar
                )
            domains.append(info)
    return {
        "vocab_size": vocab,
        "dtype": dtype,
        "eot_id": eot,
        "tokenizer": "tokenizer.json",
        "domains": domains,
    }


def _build_tokens(cfg: DataConfig, sources: list[Source], tmp: Path) -> dict[str, Any]:
    loaded = [(src, *load_tokens(src)) for src in sources]
    vocabs = {(m["vocab_size"], m["eot_id"]) for _, _, m in loaded}
    if len(vocabs) > 1:
        raise DataError(f"pre-tokenized domains disagree on (vocab_size, eot_id): {sorted(vocabs)}")
    vocab, eot = vocabs.pop()
    dtype, domains = _dtype(vocab), []
    for src, tokens, m in loaded:
        if not tokens.size:
            raise DataError(f"domain {src.dom.name!r} is empty: its files hold no tokens")
        lo, hi = _BLOCK_TOKENS
        block = min(hi, max(lo, int(tokens.size * cfg.val_fraction / _VAL_BLOCKS)))
        is_val = _pick_val(-(-tokens.size // block), cfg, src.dom.name)
        info = {"name": src.dom.name, "kind": src.dom.kind, "weight": src.dom.weight}
        for s in ("train", "val"):
            path = tmp / f"{src.dom.name}.{s}.bin"
            with open(path, "wb") as fh:
                for b in np.flatnonzero(is_val == (s == "val")):
                    fh.write(tokens[b * block : (b + 1) * block].astype(dtype).tobytes())
            n = path.stat().st_size // np.dtype(dtype).itemsize
            info[s] = {"path": path.name, "tokens": n, "bytes": round(n * m["bytes_per_token"])}
        domains.append(info)
    return {
        "vocab_size": vocab,
        "dtype": dtype,
        "eot_id": eot,
        "tokenizer": None,
        "domains": domains,
    }


def _build(cfg: DataConfig, sources: list[Source], root: Path, key: dict, show: bool) -> None:
    for stale in root.parent.glob(f".tmp-{root.name}-*"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        if sources[0].dom.kind == "tokens":
            meta = _build_tokens(cfg, sources, tmp)
        else:
            meta = _build_text(cfg, sources, tmp, show)
        for d in meta["domains"]:
            for s in ("train", "val"):
                d[s]["bytes_per_token"] = d[s]["bytes"] / max(d[s]["tokens"], 1)
        meta = {
            "format": "windtunnel-corpus",
            "format_version": FORMAT_VERSION,
            "name": cfg.name,
            "requested_vocab_size": cfg.vocab_size,
            **meta,
            "config": dataclasses.asdict(cfg),
            "key": key,
            "prepare_seconds": round(time.perf_counter() - t0, 3),
        }
        text = json.dumps(meta, indent=1, default=str)
        (tmp / "meta.json").write_text(text)
        written(CorpusMeta, json.loads(text))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "meta.json").is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_root(cfg: DataConfig) -> Path:
    """The folder where :func:`prepare` keeps the corpus of ``cfg`` (built or not; builds
    nothing). It hashes the sources, so they must still be readable."""
    return _locate(cfg)[0]


def _locate(cfg: DataConfig) -> tuple[Path, list[Source], dict[str, Any]]:
    doms = domains_of(cfg)
    validate(cfg, doms)
    sources = [resolve(d) for d in doms]
    text = doms[0].kind != "tokens"
    key: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "vocab_size": cfg.vocab_size if text else None,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "tokenizers": _tokenizers_version() if text else None,
        "domains": [
            {
                **{
                    k: getattr(s.dom, k)
                    for k in ("name", "kind", "paths", "text_field", "max_bytes")
                },
                "source": hashlib.sha256(json.dumps(s.fingerprint).encode()).hexdigest(),
            }
            for s in sources
        ],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cfg.cache_dir).expanduser().resolve() / f"{cfg.name}-{digest[:12]}", sources, key


def prepare(cfg: DataConfig, *, progress: bool = True) -> PreparedCorpus:
    """Prepare (or reuse from ``cfg.cache_dir``) the corpus described by ``cfg``."""
    root, sources, key = _locate(cfg)
    doms = domains_of(cfg)
    if not (root / "meta.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        # serialize concurrent prepares of the same corpus (the rename stays the real guard)
        with lock(root.parent / f".{root.name}.lock"):
            if not (root / "meta.json").is_file():
                if root.exists():  # not ours to trust: no meta.json means incomplete
                    shutil.rmtree(root)
                _build(cfg, sources, root, key, _show(progress))
    corpus = PreparedCorpus.load(root).with_weights({d.name: d.weight for d in doms})
    for d in corpus.domains:
        if d.val_tokens < cfg.seq_len + 1:
            raise DataError(
                f"domain {d.name!r} has {d.val_tokens} validation tokens, fewer than "
                f"seq_len+1={cfg.seq_len + 1}: add text, raise data.val_fraction "
                f"({cfg.val_fraction}) or lower data.seq_len"
            )
    return corpus


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__
