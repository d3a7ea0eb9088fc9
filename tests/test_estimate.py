"""The memory and time estimate of a run, and ``windtunnel train --dry-run``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from windtunnel import estimate as est
from windtunnel.cli import main
from windtunnel.compose import compose_run
from windtunnel.config import resolve, with_values
from windtunnel.flops import Shape

GiB = 1024**3
# micro_s: L 4, d 64, 4 heads of 16, d_ff 160, vocab 1024, tied
SMALL = Shape(n_layers=4, d_model=64, n_heads=4, n_kv_heads=4, d_head=16, d_ff=160, vocab_size=1024)
MATRIX = 4 * (2 * 64 * 64 + 2 * 64 * 64 + 3 * 64 * 160)  # 188,416
PARAMS = MATRIX + 4 * 2 * 64 + 64 + 1024 * 64  # N 188,992 + embedding 65,536


def small(**kw: object) -> est.Setup:
    base = dict(shape=SMALL, seq_len=128, batch_size=32, grad_accum=2, world_size=2, parallel="ddp")
    return est.Setup(**{**base, **kw})  # type: ignore[arg-type]


def big(**overrides: object) -> est.Setup:
    """MiniCPM-2.4B at seq 4096 (no data needed: the model config has its vocabulary)."""
    values = {"data.seq_len": 4096, "optim.batch_size": 64, **overrides}
    cfg = with_values(compose_run(["model=minicpm_2p4b"]), values)
    res = resolve(cfg, cfg.data.vocab_size)
    return est.setup_from(res, 1)


def test_activation_formula_against_hand_count() -> None:
    # attention: 4d + 2(d + 3·64 + 2·64 + 64) + 4·4 = 256 + 896 + 16; mlp: 4d + 2(d + 4·160)
    assert est.layer_activation_bytes(SMALL, 2) == 1168 + 1664
    assert est.layer_activation_bytes(SMALL, 2) == 24 * 64 + 8 * 160 + 4 * 4  # MHA, bf16
    # fp32: every compute tensor at 4 bytes
    assert est.layer_activation_bytes(SMALL, 4) == 256 + 4 * 448 + 16 + 256 + 4 * 704
    tokens = 8 * 128  # micro-batch 32 / (2 accum · 2 ranks) = 8 sequences
    assert small().micro_batch == 8
    assert est.activation_bytes(SMALL, 2, tokens, False) == tokens * (4 * 2832 + 400)
    assert est.activation_bytes(SMALL, 2, tokens, True) == tokens * (4 * 4 * 64 + 2832 + 400)
    assert est.logits_bytes(SMALL, tokens) == tokens * 1024 * 12


def test_memory_components_against_hand_count() -> None:
    assert est.total_params(SMALL) == PARAMS == 254_528
    ddp = est.memory(small(), "ddp")
    assert (ddp.parameters, ddp.gradients, ddp.optimizer) == (4 * PARAMS, 4 * PARAMS, 8 * PARAMS)
    assert ddp.weights == 2 * (MATRIX + 1024 * 64)  # autocast's bf16 copies: matrices and head
    fwd_bwd = ddp.weights + 1024 * (4 * 2832 + 400) + 1024 * 1024 * 12
    assert ddp.peak == 16 * PARAMS + est.RUNTIME_BYTES + fwd_bwd
    fsdp = est.memory(small(), "fsdp")
    assert fsdp.parameters == 4 * PARAMS / 2 and fsdp.optimizer == 8 * PARAMS / 2
    root, block = 1024 * 64 + 64, MATRIX // 4 + 2 * 64
    assert fsdp.weights == 2 * (root + 2 * block) + 2 * max(root, block)
    assert est.memory(small(compute_bytes=4), "ddp").weights == 0  # fp32: no copies


def test_fsdp_shards_states_and_ddp_replicates() -> None:
    for world in (2, 8):
        s = dataclasses.replace(big(), world_size=world)
        ddp, fsdp = est.memory(s, "ddp"), est.memory(s, "fsdp")
        assert fsdp.peak < ddp.peak
        assert fsdp.optimizer == pytest.approx(ddp.optimizer / world)
    one = big()
    ddp, fsdp = est.memory(one, "ddp"), est.memory(one, "fsdp")
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer) == (
        ddp.parameters,
        ddp.gradients,
        ddp.optimizer,
    )
    assert fsdp.peak == pytest.approx(ddp.peak, rel=0.01)


def test_activation_checkpointing_trades_memory_for_flops() -> None:
    plain, ck = big(), big(**{"train.activation_checkpointing": True})
    assert ck.activation_checkpointing
    assert est.memory(ck).activations < est.memory(plain).activations / 5  # 40 layers: 8.4x
    assert est.memory(ck).logits == est.memory(plain).logits
    extra = est.flops_per_token(ck) - est.flops_per_token(plain)
    assert extra == pytest.approx(est.flops_per_token(plain) / 3, rel=0.15)


def test_time_formula() -> None:
    s = small(tokens=10**9)
    f = 6 * MATRIX + 6 * 1024 * 64 + 6 * 4 * 128 * 4 * 16
    assert est.flops_per_token(s) == f == 1_720_320
    gpu = est.GPUS["h100"]
    assert est.tokens_per_second(s, gpu, 0.5) == pytest.approx(2 * 0.5 * 989e12 / f)
    ck = small(activation_checkpointing=True)
    assert est.flops_per_token(ck) == f + 2 * MATRIX + 2 * 4 * 128 * 64


def test_default_mfu_follows_the_measurements() -> None:
    scale = 777 / 989
    for n, eager, compiled in est.MEASURED_MFU:
        assert est.default_mfu(n, False) == pytest.approx(eager * scale)
        assert est.default_mfu(n, True) == pytest.approx(compiled * scale)
    assert est.default_mfu(10, True) == pytest.approx(0.223 * scale)  # held below
    assert est.default_mfu(10**12, True) == pytest.approx(0.486 * scale)  # held above
    assert 0.164 * scale < est.default_mfu(200_000_000, False) < 0.260 * scale


def test_suggestions_fit_and_come_least_invasive_first() -> None:
    h100 = est.GPUS["h100"]
    # 8 ranks, micro-batch 2: replicated states plus activations do not fit, sharded ones do
    s = dataclasses.replace(big(), world_size=8, grad_accum=4)
    assert s.micro_batch == 2 and not est.fits(s, h100)
    change = est.suggest(s, h100)
    assert change is not None and change.overrides == {"train.parallel": "fsdp"}
    assert est.fits(change.setup, h100)
    # one rank, micro-batch 64: only a smaller micro-batch helps; the least grad_accum that fits
    one = big()
    change = est.suggest(one, h100)
    assert change is not None and set(change.overrides) == {"optim.grad_accum"}
    accum = change.overrides["optim.grad_accum"]
    assert est.fits(change.setup, h100)
    smaller = [a for a in range(2, accum) if 64 % a == 0]
    assert not any(est.fits(dataclasses.replace(one, grad_accum=a), h100) for a in smaller)
    # a GPU too small for the states: more GPUs (and sharding)
    change = est.suggest(one, est.GPUS["a10g"])
    assert change is not None and change.world_size > 1
    assert est.fits(change.setup, est.GPUS["a10g"])


def _dry_run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict, list[str]]:
    code = main(["train", "--dry-run", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err.strip().splitlines()


def test_dry_run_refuses_a_2p4b_model_that_cannot_fit_and_says_what_fits(
    capsys: pytest.CaptureFixture,
) -> None:
    overrides = ["model=minicpm_2p4b", "data.seq_len=4096", "optim.batch_size=64"]
    code, summary, err = _dry_run(capsys, *overrides)
    assert code == 2 and not summary["fits"]
    last = err[-1]
    assert last.startswith("windtunnel train: does not fit: ddp with micro-batch 64 × 4096")
    assert "GiB over" in last and "set optim.grad_accum=" in last
    assert sum("does not fit" in line for line in err) == 1
    change = summary["change"]
    cfg = with_values(compose_run(overrides), change["overrides"])
    fixed = est.estimate(resolve(cfg, cfg.data.vocab_size), world_size=change["world_size"])
    assert fixed.fits and fixed.refusal() == ""
    assert f"optim.grad_accum={change['overrides']['optim.grad_accum']}" in last
    # applied on the command line, the same run passes
    code, summary, _ = _dry_run(
        capsys, *overrides, *(f"{k}={v}" for k, v in change["overrides"].items())
    )
    assert code == 0 and summary["fits"]


def test_dry_run_of_a_micro_model_fits(capsys: pytest.CaptureFixture) -> None:
    code, summary, err = _dry_run(capsys, "model=micro_s", "--gpu", "a100", "--mfu", "0.3")
    assert code == 0
    for key in (
        "memory",
        "peak_bytes",
        "usable_bytes",
        "fits",
        "micro_batch",
        "world_size",
        "parallel",
        "tokens_per_s",
        "tokens",
        "wall_hours",
        "gpu_hours",
        "mfu",
        "change",
    ):
        assert key in summary
    assert summary["fits"] and summary["change"] is None and summary["gpu"] == "a100"
    assert set(summary["memory"]) == {"ddp", "fsdp"}
    assert summary["mfu"] == 0.3 and summary["micro_batch"] == 32
    res = resolve(compose_run(["model=micro_s"]), 1024)
    assert summary["tokens"] == est.trained_tokens(res)
    assert summary["gpu_hours"] == pytest.approx(
        summary["tokens"] / (0.3 * 312e12 / res.flops_per_token) / 3600
    )
    assert any("ddp*" in line for line in err) and any("tokens/s" in line for line in err)


def test_dry_run_world_size_shards(capsys: pytest.CaptureFixture) -> None:
    code, summary, _ = _dry_run(capsys, "model=micro_s", "train.parallel=fsdp", "--world-size", "4")
    assert code == 0 and summary["world_size"] == 4 and summary["micro_batch"] == 8
    mem = summary["memory"]
    assert mem["fsdp"]["optimizer"] == pytest.approx(mem["ddp"]["optimizer"] / 4)
    assert summary["peak_bytes"] == mem["fsdp"]["peak"]


def test_a_gpu_of_any_size_can_be_given_directly():
    """The trainer checks against the device it runs on (its real memory), not a table row."""
    from windtunnel.compose import compose_run
    from windtunnel.config import resolve
    from windtunnel.estimate import GPU, estimate

    cfg = compose_run(["model=micro_s"])
    res = resolve(cfg, cfg.data.vocab_size)
    tiny = GPU(name="toy", peak_flops=1e12, memory_bytes=64 * 2**20)
    big = GPU(name="big", peak_flops=1e12, memory_bytes=64 * 2**30)
    assert not estimate(res, gpu=tiny, margin=1.0).fits
    assert "does not fit" in estimate(res, gpu=tiny, margin=1.0).refusal()
    assert estimate(res, gpu=big, margin=1.0).fits


def test_a_slurm_run_that_cannot_fit_is_refused_before_it_is_submitted(tmp_path) -> None:
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "windtunnel",
        "train",
        "model=minicpm_2p4b",
        "data.seq_len=4096",
        "optim.batch_size=64",
        "launcher=slurm",
        f"launcher.folder={tmp_path}/submitit",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "does not fit" in line and "set optim.grad_accum=" in line and "--gpu h100" in line
    assert not (tmp_path / "submitit").exists()  # nothing was submitted
