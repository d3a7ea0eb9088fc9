"""Corpus preparation, tokenizer, token memmaps and batches.

Public API (import from ``windtunnel.data``): :func:`prepare`, :func:`corpus_root`,
:class:`PreparedCorpus`, :class:`DomainInfo`, :class:`BatchSampler`, :func:`val_batches`,
:func:`bits_per_byte`, :func:`load_tokenizer`, :func:`encode`, :func:`decode`, :class:`DataError`.

:func:`prepare` turns a :class:`~windtunnel.config.DataConfig` into a prepared corpus folder,
``<cache_dir>/<name>-<key>/``, where ``key`` hashes everything that changes the output (config
fields except ``weight``/``seq_len``/``cache_dir``, a fingerprint of the source files, the
``tokenizers`` version and :data:`FORMAT_VERSION`)::

    meta.json              format, vocab, dtype, config, sources, per-domain counts (written last)
    tokenizer.json         byte-level BPE (absent when every domain is pre-tokenized)
    <domain>.train.bin     raw little-endian token ids, uint16 if vocab <= 65536 else uint32
    <domain>.val.bin       held-out tokens of the same domain, never overlapping train

Each domain is cut into blocks (about ``val_fraction/16`` of the domain, 512 chars to 64 KiB,
at line ends; documents smaller than a block are grouped) and a seeded RNG picks
``round(val_fraction · blocks)`` of them for validation, so validation covers many documents.
``<|endoftext|>`` follows every document. Bytes per token = UTF-8 bytes of the split's text /
its tokens (EOTs included), which is what :func:`bits_per_byte` needs for a mean token loss.

Pre-tokenized domains (kind ``tokens``): ``X.npy`` (int array) or ``X.bin`` (raw ids), each with
a sidecar ``X.json`` such as ``{"vocab_size": 50257, "bytes_per_token": 4.2, "dtype": "uint16",
"eot_id": 50256}`` (``dtype`` needed for ``.bin`` only, ``eot_id`` optional). Token ids of
different tokenizers cannot share a model, so a corpus is either all text or all tokens.
"""

from windtunnel.data.build import corpus_root, prepare
from windtunnel.data.corpus import (
    EOT,
    FORMAT_VERSION,
    BatchSampler,
    DataError,
    DomainInfo,
    PreparedCorpus,
    bits_per_byte,
    decode,
    encode,
    load_tokenizer,
    val_batches,
)

__all__ = [
    "EOT",
    "FORMAT_VERSION",
    "BatchSampler",
    "DataError",
    "DomainInfo",
    "PreparedCorpus",
    "bits_per_byte",
    "corpus_root",
    "decode",
    "encode",
    "load_tokenizer",
    "prepare",
    "val_batches",
]
