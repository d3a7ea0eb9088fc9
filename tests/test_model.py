"""The decoder: exact parameter counts, μP expressions and optimizer groups."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from windtunnel.cli import main
from windtunnel.compose import compose_run as compose
from windtunnel.config import ModelConfig, OptimConfig, resolve_model
from windtunnel.model import Decoder
from windtunnel.mup import param_groups

PAPER = {"minicpm_2p4b": 2_442_057_984, "minicpm_1p2b": 1_247_442_432, "minicpm_9m": 9_426_240}


@pytest.mark.parametrize(("model", "n"), PAPER.items())
def test_params_command_reproduces_paper_counts(
    model: str, n: int, capsys: pytest.CaptureFixture
) -> None:
    assert main(["params", f"model={model}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["non_embedding_params"] == n
    assert out["embedding_params"] > 0 and out["flops_per_token"] > 6 * n


def _tiny(**kw) -> ModelConfig:
    base = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, vocab_size=97, max_seq_len=64)
    return resolve_model(dataclasses.replace(base, **kw))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"tie_embeddings": False}])
def test_counted_params_equal_the_modules(kw: dict) -> None:
    from windtunnel import flops
    from windtunnel.config import model_shape

    cfg = _tiny(**kw)
    model = Decoder(cfg)
    shape = model_shape(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total == flops.non_embedding_params(shape) + flops.embedding_params(shape)
    logits = model(torch.randint(0, 97, (2, 10)))
    assert logits.shape == (2, 10, 97)


def test_causal_future_tokens_do_not_change_the_past() -> None:
    torch.manual_seed(0)
    model = Decoder(_tiny())
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-5)


def test_mup_logits_are_divided_by_the_width_multiplier() -> None:
    torch.manual_seed(0)
    mup = Decoder(_tiny(dim_model_base=16))  # m = 4
    sp = Decoder(_tiny(mup=False))
    sp.load_state_dict(mup.state_dict())
    x = torch.randint(0, 97, (2, 8))
    assert torch.allclose(mup(x) * 4, sp(x), atol=1e-4)


def test_mup_init_and_lr_scale_with_width() -> None:
    optim = OptimConfig(lr=0.01)
    for d in (64, 256):
        cfg = _tiny(d_model=d, n_heads=d // 16, dim_model_base=64)
        m = d / 64
        torch.manual_seed(0)
        model = Decoder(cfg)
        w = model.blocks[0].mlp.w2.weight
        assert w.std().item() == pytest.approx(0.1 / m**0.5, rel=0.1)
        assert model.embed.weight.std().item() == pytest.approx(0.1, rel=0.1)
        groups = {g["name"]: g for g in param_groups(model, cfg, optim)}
        assert groups["hidden"]["lr"] == pytest.approx(0.01 / m)
        assert groups["embedding"]["lr"] == pytest.approx(0.01)
        assert groups["vector"]["weight_decay"] == 0.0
        assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_scaled_embedding_option() -> None:
    cfg = _tiny(d_model=256, n_heads=16, dim_model_base=64, mup_scale_embedding=True)
    groups = {g["name"]: g for g in param_groups(Decoder(cfg), cfg, OptimConfig(lr=0.01))}
    assert groups["embedding"]["lr"] == pytest.approx(0.01 / 4)


def test_resolved_config_required() -> None:
    with pytest.raises(ValueError, match="resolved"):
        Decoder(ModelConfig())
    assert compose(["model=micro_s"]).model.d_model == 64
