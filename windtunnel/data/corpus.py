"""The prepared corpus on disk and what reads it: batches, validation windows, tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from windtunnel.schema import FileModel, SchemaError, load_versioned

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

FORMAT_VERSION = 1
EOT = "<|endoftext|>"


class DataError(ValueError):
    """Bad data configuration or input files; the message says how to fix it."""


class CorpusMetaError(DataError, SchemaError):
    """A prepared corpus's ``meta.json`` this windtunnel cannot read: path, field, what to do."""


class SplitMeta(FileModel):
    path: str
    tokens: int
    bytes: int


class DomainMeta(FileModel):
    name: str
    kind: str
    weight: float
    train: SplitMeta
    val: SplitMeta


class CorpusMeta(FileModel):
    """``meta.json`` of a prepared corpus (written by :mod:`windtunnel.data.build`); its version
    is ``format_version``, which every corpus has had."""

    format: str = "windtunnel-corpus"
    format_version: int
    vocab_size: int
    dtype: str
    eot_id: int | None
    tokenizer: str | None
    domains: list[DomainMeta]


@dataclass(frozen=True, kw_only=True)
class DomainInfo:
    """One prepared domain: token counts, text bytes and its two token files."""

    name: str
    kind: str
    weight: float
    train_tokens: int
    val_tokens: int
    train_bytes: int
    val_bytes: int
    train_path: Path
    val_path: Path

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token of the validation split (use it for validation bits per byte)."""
        return self.val_bytes / self.val_tokens

    @property
    def train_bytes_per_token(self) -> float:
        """Bytes per token of the training split."""
        return self.train_bytes / self.train_tokens


@dataclass(frozen=True, kw_only=True)
class PreparedCorpus:
    """A prepared corpus folder (layout: see :mod:`windtunnel.data`)."""

    root: Path
    vocab_size: int
    domains: tuple[DomainInfo, ...]
    tokenizer_path: Path | None
    eot_id: int | None
    dtype: str

    @classmethod
    def load(cls, root: str | Path) -> PreparedCorpus:
        """Open an existing prepared corpus (weights are those it was prepared with)."""
        root = Path(root)
        if not (root / "meta.json").is_file():
            raise DataError(f"{root} is not a prepared corpus (no meta.json)")
        _, meta = load_versioned(
            root / "meta.json",
            {FORMAT_VERSION: CorpusMeta},
            what="prepared corpus",
            fix="prepare it again (delete the folder; the next run prepares it)",
            key="format_version",
            default=None,
            error=CorpusMetaError,
        )
        doms = tuple(
            DomainInfo(
                name=d["name"],
                kind=d["kind"],
                weight=d["weight"],
                train_tokens=d["train"]["tokens"],
                val_tokens=d["val"]["tokens"],
                train_bytes=d["train"]["bytes"],
                val_bytes=d["val"]["bytes"],
                train_path=root / d["train"]["path"],
                val_path=root / d["val"]["path"],
            )
            for d in meta["domains"]
        )
        tok = meta["tokenizer"]
        return cls(
            root=root,
            vocab_size=meta["vocab_size"],
            domains=doms,
            tokenizer_path=root / tok if tok else None,
            eot_id=meta["eot_id"],
            dtype=meta["dtype"],
        )

    def domain(self, name: str) -> DomainInfo:
        """The domain called ``name``."""
        for d in self.domains:
            if d.name == name:
                return d
        raise DataError(f"no domain {name!r}; domains: {', '.join(d.name for d in self.domains)}")

    def with_weights(self, weights: dict[str, float]) -> PreparedCorpus:
        """Same corpus, sampling weights replaced (weights do not change the prepared files)."""
        doms = tuple(
            dataclasses.replace(d, weight=weights.get(d.name, d.weight)) for d in self.domains
        )
        return dataclasses.replace(self, domains=doms)

    @property
    def unique_train_tokens(self) -> int:
        """Training tokens in one epoch of the domains with weight > 0 (for repetition reports)."""
        return sum(d.train_tokens for d in self.domains if d.weight > 0)


# ----------------------------------------------------------------------------- batches


def _open(path: Path, dtype: str) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r").view(np.ndarray)


class BatchSampler:
    """Random training windows; the batch of ``step`` is a pure function of ``(seed, step)``, so a
    resumed run needs only its step, and micro-batches and ranks take row slices of that one
    global batch (the curve depends on neither). Each row picks a domain by weight, then a
    uniform window of ``seq_len + 1`` tokens of that domain's train split."""

    def __init__(self, corpus: PreparedCorpus, *, seq_len: int, batch_size: int, seed: int = 0):
        if seq_len < 1 or batch_size < 1 or seed < 0:
            raise DataError(f"need seq_len ({seq_len}), batch_size ({batch_size}) > 0, seed >= 0")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.domains = tuple(d for d in corpus.domains if d.weight > 0)
        if not self.domains:
            raise DataError("no domain has weight > 0: nothing to train on")
        for d in self.domains:
            if d.train_tokens < seq_len + 1:
                raise DataError(
                    f"domain {d.name!r} has {d.train_tokens} train tokens, fewer than "
                    f"seq_len+1={seq_len + 1}: lower seq_len or give it weight 0"
                )
        self._tokens = [_open(d.train_path, corpus.dtype) for d in self.domains]
        w = np.array([d.weight for d in self.domains])
        self._p = w / w.sum()
        self._high = np.array([d.train_tokens - seq_len for d in self.domains])
        self._window = np.arange(seq_len + 1)

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain index (into ``self.domains``) and start offset of each row of a batch."""
        if step < 0:
            raise ValueError(f"step ({step}) must be >= 0")
        rng = np.random.default_rng([self.seed, step, 0])
        if len(self._tokens) == 1:
            dom = np.zeros(self.batch_size, np.int64)
        else:
            dom = rng.choice(len(self._tokens), size=self.batch_size, p=self._p)
        return dom, rng.integers(0, self._high[dom])

    def batch(self, step: int, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, int64 ``[batch_size, seq_len]``, ``y`` is ``x`` shifted by one token;
        ``rows``: only those rows of that batch (a micro-batch, a rank's share; only they are
        read)."""
        import torch

        dom, off = self.plan(step)
        if rows is not None:
            dom, off = dom[rows], off[rows]
        out = np.empty((len(dom), self.seq_len + 1), np.int64)
        for k, tokens in enumerate(self._tokens):
            mine = np.flatnonzero(dom == k)
            if mine.size:
                out[mine] = tokens[off[mine, None] + self._window]
        t = torch.from_numpy(out)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def val_batches(
    corpus: PreparedCorpus, domain: str, *, seq_len: int, n_tokens: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of non-overlapping validation windows of ``domain`` (at most ``n_tokens``
    target tokens), evenly spread over its val split, in batches of ``batch_size``."""
    import torch

    d = corpus.domain(domain)
    slots = (d.val_tokens - 1) // seq_len if seq_len > 0 else 0
    n = min(n_tokens // seq_len if seq_len > 0 else 0, slots)
    if n < 1 or batch_size < 1:
        raise DataError(
            f"domain {domain!r}: no validation window of seq_len={seq_len} fits (val tokens "
            f"{d.val_tokens}, n_tokens {n_tokens}, batch_size {batch_size})"
        )
    starts = np.linspace(0, slots - 1, n).round().astype(np.int64) * seq_len
    windows = _open(d.val_path, corpus.dtype)[starts[:, None] + np.arange(seq_len + 1)]
    t = torch.from_numpy(windows.astype(np.int64))
    return [
        (t[i : i + batch_size, :-1].contiguous(), t[i : i + batch_size, 1:].contiguous())
        for i in range(0, n, batch_size)
    ]


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Mean loss in nats per token → bits per byte of text."""
    if not bytes_per_token > 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return loss_nats_per_token / math.log(2) / bytes_per_token


# ----------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=8)
def _tokenizer_at(path: str) -> Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(corpus: PreparedCorpus) -> Tokenizer:
    """The corpus's ``tokenizers.Tokenizer`` (text corpora only)."""
    if corpus.tokenizer_path is None:
        raise DataError(f"{corpus.root} is pre-tokenized: it has no tokenizer")
    return _tokenizer_at(str(corpus.tokenizer_path))


def encode(corpus: PreparedCorpus, text: str) -> list[int]:
    """Token ids of ``text`` (``<|endoftext|>`` inside it is plain text)."""
    return load_tokenizer(corpus).encode(text).ids


def decode(corpus: PreparedCorpus, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Text of token ids (EOT shown as ``<|endoftext|>`` unless ``skip_special``)."""
    return load_tokenizer(corpus).decode(list(map(int, ids)), skip_special_tokens=skip_special)
