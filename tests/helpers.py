"""Small builders shared by the trainer tests: a tiny corpus config and journal readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import REPO

TINY_DOMAINS = (
    f"data.domains=[{{name: prose, kind: files, paths: ['{REPO}/tests/data/prose/*']}},"
    f"{{name: code, kind: files, paths: ['{REPO}/tests/data/code.jsonl']}}]"
)


def tiny_overrides(tmp: Path, *extra: str) -> list[str]:
    """A micro proxy on the repo's 8 KB test corpus, journaled locally, single-threaded."""
    return [
        "model=micro_xxs",
        "data.name=tiny",
        "data.vocab_size=300",
        "data.seq_len=32",
        "data.val_fraction=0.1",
        f"data.cache_dir={tmp}/data",
        TINY_DOMAINS,
        "optim.batch_size=8",
        "optim.lr=0.01",
        "train.threads=1",
        "train.eval_tokens=512",
        "train.progress=false",
        "tracker=jsonl",
        f"run_dir={tmp}/runs",
        *extra,
    ]


def local_sweep(tmp: Path, *run: str) -> tuple[list[str], list[str], dict[str, str]]:
    """``(overrides, command, environment)`` of a 4-trial smoke sweep on this machine (two at a
    time, random sampler, no pruner) of tiny runs, as a subprocess runs it."""
    import os
    import sys

    args = [
        f"sweep.dir={tmp}/sweeps",
        "launcher=local",
        "sweep.n_trials=4",
        "sweep.parallelism=2",
        "sweep.pruner.kind=none",
        "sweep.sampler.kind=random",
        *tiny_overrides(tmp, *run),
    ]
    cmd = [sys.executable, "-m", "windtunnel", "sweep", str(REPO / "sweeps/smoke.yaml"), *args]
    return args, cmd, {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}


def journal_metrics(path: Path) -> dict[str, dict[int, float]]:
    """metric name → {step: value} from a run journal (the last value per step wins)."""
    out: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        ev: dict[str, Any] = json.loads(line)
        if ev.get("ev") == "metrics":
            for k, v in ev["values"].items():
                out.setdefault(k, {})[int(ev["step"])] = v
    return out


def journal_counts(path: Path) -> dict[tuple[str, int], int]:
    """How many times each (metric, step) was journaled."""
    counts: dict[tuple[str, int], int] = {}
    for line in path.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("ev") == "metrics":
            for k in ev["values"]:
                counts[(k, int(ev["step"]))] = counts.get((k, int(ev["step"])), 0) + 1
    return counts


def curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every journaled train/loss and val_loss of a run and of its branches."""
    out: dict[str, dict[int, float]] = {}
    for journal in sorted(run_dir.rglob("journal.jsonl")):
        where = journal.parent.relative_to(run_dir).as_posix()
        for key, points in journal_metrics(journal).items():
            if key in ("train/loss", "val_loss"):
                out[f"{where}:{key}"] = points
    return out


def assert_same_curves(got: Path, want: Path, rtol: float) -> None:
    """The runs in ``got`` and ``want`` have the same curves, point for point, to ``rtol``."""
    import pytest

    a, b = curves(got), curves(want)
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].keys() == b[key].keys(), key
        for step, value in b[key].items():
            assert a[key][step] == pytest.approx(value, rel=rtol), (key, step)
