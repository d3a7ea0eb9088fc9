"""A golden loss curve: a fixed-seed micro run on CPU in fp32, one thread, compared step for step
with ``tests/golden/micro_loss_curve.json``.

Any change to what a step computes (init, data order, tokenizer, μP multipliers, optimizer,
schedule, loss) moves these numbers; a change that should not (a refactor) must leave them.
When a change is meant to move them, regenerate the file and commit it with that change:

    WINDTUNNEL_REGEN_GOLDEN=1 pytest tests/test_golden_curve.py
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import pytest
from helpers import journal_metrics, tiny_overrides

from windtunnel.compose import compose_run as compose
from windtunnel.train import train

GOLDEN = Path(__file__).parent / "golden" / "micro_loss_curve.json"
STEPS = 20
BATCH, SEQ = 8, 32  # as in tiny_overrides
RUN = [
    "model=micro_xxxs",  # the smallest proxy: 2 layers, d_model 16
    f"train.tokens={STEPS * BATCH * SEQ}",
    f"train.eval_every_tokens={STEPS * BATCH * SEQ}",  # evaluate at the start and the end only
    "train.device=cpu",
    "train.dtype=float32",
    "train.threads=1",
    "train.seed=0",
    "data.seed=0",
    "name=golden",
]
# Tolerance. On one machine this run is bit-for-bit repeatable (CPU, fp32, one thread, fixed
# seeds: the trainer's own resume test relies on it), so any difference there is a real change.
# Another CPU (other SIMD width, other BLAS kernel) sums in another order: fp32 rounding
# (~1e-7 relative per operation) then grows over 20 Adam steps to ~1e-6. 1e-5 relative leaves
# room for that and still catches real changes: a 1e-4 relative change of the lr moves the curve
# by ~2e-5, a 10% change of the weight decay by ~8e-4.
REL = 1e-5


def _run(tmp: Path) -> dict[str, Any]:
    overrides = [o for o in tiny_overrides(tmp) if not o.startswith("model=")]
    result = train(compose([*overrides, *RUN]))
    assert result.status == "finished", result.failure
    metrics = journal_metrics(Path(result.run_dir) / "journal.jsonl")
    losses, lrs = metrics["train/loss"], metrics["lr"]  # keyed by tokens seen
    tokens_per_step = BATCH * SEQ
    assert sorted(losses) == [tokens_per_step * (i + 1) for i in range(STEPS)], sorted(losses)
    return {
        "train_loss": [losses[t] for t in sorted(losses)],
        "lr": [lrs[t] for t in sorted(lrs)],
        "initial_val_loss": result.initial_val_loss,
        "val_loss": result.val_loss,
        "val_bpb": result.val_bpb,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def test_micro_run_matches_the_golden_loss_curve(tmp_path: Path) -> None:
    got = _run(tmp_path)
    if os.environ.get("WINDTUNNEL_REGEN_GOLDEN") == "1":
        import torch

        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        made_on = f"torch {torch.__version__}, {platform.machine()}, {_cpu_model()}"
        meta = {"regenerate": "WINDTUNNEL_REGEN_GOLDEN=1 pytest tests/test_golden_curve.py"}
        meta |= {"made_on": made_on, "run": RUN, "tokens_per_step": BATCH * SEQ}
        GOLDEN.write_text(json.dumps({**meta, **got}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["run"] == RUN, "the run changed: WINDTUNNEL_REGEN_GOLDEN=1 regenerates"
    hint = f"(golden made on {golden['made_on']}; WINDTUNNEL_REGEN_GOLDEN=1 regenerates)"
    assert len(got["train_loss"]) == len(golden["train_loss"]) == STEPS
    for step, (a, b) in enumerate(zip(got["train_loss"], golden["train_loss"], strict=True), 1):
        assert a == pytest.approx(b, rel=REL), f"train loss at step {step}: {a} != {b} {hint}"
    assert got["lr"] == pytest.approx(golden["lr"], rel=REL), f"lr schedule {hint}"
    for key in ("initial_val_loss", "val_loss", "val_bpb"):
        assert got[key] == pytest.approx(golden[key], rel=REL), f"{key} {hint}"
    assert got["val_loss"] < got["initial_val_loss"] - 1  # it learned something
