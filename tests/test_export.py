"""``windtunnel export``: a run's model as a plain Hugging Face Llama, a plan as a MiniCPM config.

The exported folder is loaded by ``transformers`` (no remote code) and must give windtunnel's
logits on the same tokens. Tolerance, fp32 on CPU: max |Δlogit| ≤ 1e-5 · max |logit|. The two
networks compute the same function with the same fp32 weights up to the folded multipliers (each
weight rounded once from an exact float64 product) and a different order of the same operations
(RoPE as complex products vs rotate_half, SDPA vs eager attention, x·(a·W) vs a·(x·W)), which
differs by a few ulps per operation (fp32 ulp ≈ 1.2e-7). Measured: 0.7e-6 (GQA, μP, tied) and
1.2e-6 (MHA, SP, untied) of the logits' scale (max |Δlogit| 2e-6 and 1.2e-5 on logits up to 3.5
and 9.4). A wrong RoPE pairing is off by O(1) (checked below): the bound separates the two by
five orders of magnitude.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, skip_or_fail
from helpers import tiny_overrides

from windtunnel import checkpoint, export
from windtunnel.cli import main
from windtunnel.compose import compose_run
from windtunnel.config import RunConfig, resolve, to_dict
from windtunnel.data import PreparedCorpus, encode, prepare
from windtunnel.distributed import World
from windtunnel.model import Decoder

REL_TOL = 1e-5
"""max |Δlogit| / max |logit| allowed between transformers and windtunnel (see the docstring)."""

GQA_MUP = (
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_head=8",  # 4 heads · 8 = d_model 32 (micro_xxs's width and depth)
    "model.dim_model_base=16",  # m = 2
    "model.scale_emb=3.0",
    "model.scale_depth=1.7",
    "model.norm_eps=1e-6",
)
UNTIED_SP = ("model.tie_embeddings=false", "model.mup=false", "model.scale_emb=2.5")


def _extra(module: str) -> Any:
    """The ``export`` extra is in the dev extra: missing is a skip here, a failure in CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_or_fail(f"{module} is not installed: pip install 'windtunnel[export]'")


@pytest.fixture
def safetensors() -> Any:
    """For the tests that write weights (exporting needs safetensors)."""
    return _extra("safetensors")


@pytest.fixture
def transformers(safetensors) -> Any:
    """For the tests that read the export back."""
    return _extra("transformers")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreparedCorpus]:
    tmp = tmp_path_factory.mktemp("corpus")
    return tmp, prepare(compose_run(tiny_overrides(tmp)).data, progress=False)


def _config(tmp: Path, *overrides: str) -> RunConfig:
    return resolve(compose_run(tiny_overrides(tmp, *overrides)), 300).cfg


def make_run(
    tmp: Path,
    *overrides: str,
    segments: dict[str, int] | None = None,
    legacy: tuple[str, ...] = (),
    seed: int = 0,
) -> tuple[Path, RunConfig, Decoder]:
    """A run folder like the trainer's: config.json (model resolved) and checkpoints of a
    random model (norm weights too, so their semantics are checked) at the given steps."""
    cfg = _config(tmp, *overrides)
    res = resolve(cfg)
    run = tmp / "runs" / f"run-{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**to_dict(cfg), "resolved": res.summary()}))
    torch.manual_seed(seed)
    model = Decoder(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(3.0)  # sharper attention than at init: the RoPE pairing matters more
    steps = segments if segments is not None else {"main": res.total_steps}
    for name, step in steps.items():
        path = run / "ckpt" / name
        path.parent.mkdir(exist_ok=True)
        if name in legacy:
            state = {"model": model.state_dict(), "optimizer": {}, "step": step, "guard": (0, 0)}
            torch.save(state, path.with_name(name + ".pt"))
        else:
            opt = torch.optim.AdamW(model.parameters())
            checkpoint.save(path, model, opt, {"step": step, "guard": [0, 0]}, World())
    return run, cfg, model


def logits_gap(transformers: Any, out: Path, model: Decoder) -> float:
    """Load ``out`` with plain transformers (no remote code) and compare its logits with
    ``model``'s on random tokens: max |Δlogit| / max |logit|."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float()  # bf16 exports too
    assert type(hf).__name__ == "LlamaForCausalLM" and not hf.config.tie_word_embeddings
    tokens = torch.randint(
        0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, theirs = model.eval()(tokens), hf.eval()(tokens).logits
    return float((ours - theirs).abs().max() / ours.abs().max())


# ---------------------------------------------------------------------------------------------
# the weights: transformers computes windtunnel's function
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [GQA_MUP, UNTIED_SP], ids=["gqa-mup-tied", "mha-sp-untied"])
def test_transformers_gives_windtunnels_logits(transformers, tmp_path, overrides) -> None:
    run, cfg, model = make_run(tmp_path, *overrides)
    factors = export.fold_factors(cfg.model)
    if cfg.model.mup:  # the folds are exercised: none of the multipliers is 1
        assert factors == pytest.approx(
            {"embedding": 3.0, "residual": 1.7 / 2**0.5, "lm_head": 0.5}
        )
    summary = export.export_hf(run, tmp_path / "out", tokenizer=False)
    assert summary["step"] == resolve(cfg).total_steps and summary["folded"] == factors
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "windtunnel.json",
    ]
    rel = logits_gap(transformers, tmp_path / "out", model)
    print(f"max |Δlogit| / max |logit| = {rel:.2e}")
    assert rel <= REL_TOL


def test_a_wrong_rope_pairing_is_far_outside_the_tolerance(
    transformers, tmp_path, monkeypatch
) -> None:
    """The bound is meaningful: exporting q/k rows unpermuted breaks the match by far."""
    run, _, model = make_run(tmp_path, *GQA_MUP)
    monkeypatch.setattr(export, "halves_order", lambda d: torch.arange(d))
    export.export_hf(run, tmp_path / "out", tokenizer=False)
    assert logits_gap(transformers, tmp_path / "out", model) > 1e3 * REL_TOL


def test_bfloat16_export_is_close(transformers, tmp_path) -> None:
    run, _, model = make_run(tmp_path, *GQA_MUP)
    export.export_hf(run, tmp_path / "out", tokenizer=False, dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert logits_gap(transformers, tmp_path / "out", model) < 0.05  # 8-bit mantissa


# ---------------------------------------------------------------------------------------------
# which checkpoint: the finished model, a point, any checkpoint; DCP, legacy .pt, 2 FSDP ranks
# ---------------------------------------------------------------------------------------------


def test_default_is_the_largest_finished_branch_and_point_picks_another(
    safetensors, tmp_path
) -> None:
    branches = "train.branch_tokens=[8192,16384]"
    cfg = _config(tmp_path, branches)
    steps = {p.tokens: p.total_steps for p in resolve(cfg).points}
    run, _, _ = make_run(
        tmp_path,
        branches,
        segments={"trunk": 3, "branch-8192": steps[8192], "branch-16384": steps[16384]},
        legacy=("branch-8192",),
    )
    assert export.segments(run) == ["branch-16384", "branch-8192", "trunk"]
    assert export.find_checkpoint(run, cfg) == run / "ckpt" / "branch-16384"
    assert export.find_checkpoint(run, cfg, 8192) == run / "ckpt" / "branch-8192"
    summary = export.export_hf(run, tmp_path / "out", point=8192, tokenizer=False)
    assert summary["checkpoint"].endswith("branch-8192.pt") and summary["step"] == steps[8192]
    with pytest.raises(
        export.ExportError, match="no point at 1234 tokens; its points: 8192, 16384"
    ):
        export.find_checkpoint(run, cfg, 1234)


def test_an_unfinished_segment_is_exported_only_when_named(transformers, tmp_path) -> None:
    run, _, model = make_run(tmp_path, *GQA_MUP, segments={"main": 5})
    with pytest.raises(export.ExportError, match=r"at step 5 of .*--checkpoint"):
        export.export_hf(run, tmp_path / "out", tokenizer=False)
    summary = export.export_hf(
        run, tmp_path / "out", checkpoint_path=run / "ckpt" / "main", tokenizer=False
    )
    assert summary["step"] == 5
    assert logits_gap(transformers, tmp_path / "out", model) <= REL_TOL


FSDP_SAVE = """
import sys, torch
from pathlib import Path
from torch.distributed.fsdp import fully_shard
from windtunnel import checkpoint
from windtunnel.config import ModelConfig, from_dict
from windtunnel.distributed import process_group, world_from_env
from windtunnel.model import Decoder
import json

tmp = Path(sys.argv[1])
world = world_from_env()
with process_group(world, torch.device("cpu")):
    model = Decoder(from_dict(ModelConfig, json.loads((tmp / "model.json").read_text())))
    model.load_state_dict(torch.load(tmp / "weights.pt"))
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp / "ckpt", model, opt, {"step": 7, "guard": [0, 0]}, world, parallel="fsdp")
"""


@pytest.mark.slow
def test_a_checkpoint_saved_by_two_fsdp_ranks(transformers, tmp_path) -> None:
    run, cfg, model = make_run(tmp_path, *GQA_MUP, segments={})
    (tmp_path / "model.json").write_text(json.dumps(dataclasses.asdict(cfg.model)))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "save.py").write_text(FSDP_SAVE)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ranks = subprocess.Popen(
        [*cmd, str(tmp_path / "save.py"), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # torchrun and both ranks: one group to kill on a timeout
    )
    try:
        output, _ = ranks.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(ranks.pid, signal.SIGKILL)
        raise
    assert ranks.returncode == 0, output[-3000:]
    meta = checkpoint.read_meta(tmp_path / "ckpt")
    assert (meta["world_size"], meta["parallel"]) == (2, "fsdp")
    assert len(list((tmp_path / "ckpt").glob("*.distcp"))) == 2
    export.export_hf(run, tmp_path / "out", checkpoint_path=tmp_path / "ckpt", tokenizer=False)
    assert logits_gap(transformers, tmp_path / "out", model) <= REL_TOL


def test_a_trained_run_exports_to_its_own_validation_loss(transformers, tmp_path, capsys) -> None:
    """End to end: ``windtunnel train`` (GQA), ``windtunnel export``, then transformers scores
    the run's validation windows with the loss the trainer reported."""
    import torch.nn.functional as F

    from windtunnel.data import val_batches
    from windtunnel.train import train

    cfg = compose_run(tiny_overrides(tmp_path, "train.tokens=5120", "model.n_kv_heads=1"))
    result = train(cfg)
    assert result.status == "finished"
    assert main(["export", result.run_dir, "--to", "hf", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"] == 5120
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    corpus = prepare(cfg.data, progress=False)
    for domain in corpus.domains:
        total = count = 0.0
        for x, y in val_batches(
            corpus, domain.name, seq_len=32, n_tokens=cfg.train.eval_tokens, batch_size=8
        ):
            with torch.no_grad():
                logits = hf(x).logits
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        reported = result.points[0].domains[domain.name]["loss"]
        assert total / count == pytest.approx(reported, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_gives_windtunnels_ids(transformers, tmp_path, tiny_corpus) -> None:
    cache, corpus = tiny_corpus
    run, _, _ = make_run(tmp_path, f"data.cache_dir={cache}/data")
    summary = export.export_hf(run, tmp_path / "out")
    assert summary["tokenizer"] == str(corpus.tokenizer_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "Ünïcödé 😀 café\n\tdef f(x):\n    return x  # <|endoftext|> stays text\nTo be, or not"
    assert tok(text)["input_ids"] == encode(corpus, text)
    assert tok.decode(encode(corpus, text)) == text
    assert tok.eos_token_id == corpus.eot_id
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == corpus.eot_id


def test_a_missing_corpus_says_what_to_do(safetensors, tmp_path, tiny_corpus) -> None:
    run, _, _ = make_run(tmp_path, f"data.cache_dir={tmp_path}/elsewhere")
    with pytest.raises(export.ExportError, match=r"not prepared at .*--tokenizer PATH"):
        export.export_hf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = export.export_hf(run, tmp_path / "out", tokenizer=tiny_corpus[1].root)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and summary["tokenizer"]


def test_pre_tokenized_runs_export_without_a_tokenizer(safetensors, tmp_path, capsys) -> None:
    tokens = "data.domains=[{name: web, kind: tokens, paths: [web.npy]}]"
    run, _, _ = make_run(tmp_path, tokens)
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "out")]) == 0
    assert "no tokenizer (the run was trained on pre-tokenized data)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tokenizer.json").exists()


# ---------------------------------------------------------------------------------------------
# MiniCPM's config for the planned full run
# ---------------------------------------------------------------------------------------------

MINICPM_2B = {  # MiniCPM-2.4B (Hu et al. 2024; DESIGN §2) as its config.json writes it
    "architectures": ["MiniCPMForCausalLM"],
    "model_type": "minicpm",
    "hidden_size": 2304,
    "num_hidden_layers": 40,
    "num_attention_heads": 36,
    "num_key_value_heads": 36,
    "intermediate_size": 5760,
    "vocab_size": 122753,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "initializer_range": 0.1,
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def test_minicpm_config_of_a_plan_is_minicpms(tmp_path, capsys) -> None:
    from windtunnel.scaling import DataModelLaw
    from windtunnel.scaling.plan import make_plan

    law = DataModelLaw.from_minicpm(C_N=7.15e-2, C_D=3.00e-1, alpha=0.29, beta=0.23, L0=0.31)
    fit = {"kind": "windtunnel.scaling.fit", "version": 1, "fit": {**law.to_dict()}}
    mup = {"scale_emb": 12.0, "scale_depth": 1.4, "init_std": 0.1}
    plan = make_plan(fit, params=2.44e9, tokens=1e12, mup=mup, batch_tokens=4e6)
    (tmp_path / "full.yaml").write_text(plan.to_yaml())
    argv = ["export", str(tmp_path / "full.yaml"), "--to", "minicpm-config", str(tmp_path / "cfg")]
    assert main(argv) == 0
    written = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert {k: written[k] for k in MINICPM_2B} == MINICPM_2B
    assert json.loads(capsys.readouterr().out)["config"] == written


def test_minicpm_config_of_a_run_folder(tmp_path) -> None:
    run, cfg, _ = make_run(tmp_path, *GQA_MUP)
    export.export_minicpm_config(run, tmp_path / "cfg")
    written = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert (written["num_key_value_heads"], written["dim_model_base"]) == (2, 16)
    assert written["vocab_size"] == cfg.model.vocab_size == 300


# ---------------------------------------------------------------------------------------------
# the command's errors: one line on stderr, exit 2
# ---------------------------------------------------------------------------------------------


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(safetensors, tmp_path, capsys) -> None:
    out = str(tmp_path / "out")
    assert "has no config.json" in _error(capsys, ["export", str(tmp_path), out])
    run, _, _ = make_run(tmp_path, segments={})
    assert "no checkpoint of a finished model" in _error(capsys, ["export", str(run), out])
    assert "--to: invalid choice: 'gguf'" in _error(
        capsys, ["export", str(run), "--to", "gguf", out]
    )
    missing = str(tmp_path / "nope")
    err = _error(capsys, ["export", str(run), out, "--checkpoint", missing])
    assert "--checkpoint" in err and "does not exist" in err  # refused where it enters
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    run2, _, _ = make_run(tmp_path, seed=1)
    argv = ["export", str(run2), str(tmp_path / "full"), "--no-tokenizer"]
    assert "not empty" in _error(capsys, argv)
    assert main([*argv, "--force"]) == 0
    assert not (tmp_path / "full" / "x").exists()
    assert json.loads(capsys.readouterr().out)["to"] == "hf"
    protect = ["export", str(run2), str(run2.parent), "--force", "--no-tokenizer"]
    assert "holds the run being exported" in _error(capsys, protect)
    assert (run2 / "config.json").is_file() and not run2.with_name("runs.partial").exists()
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"stage": "full"}))
    assert "has no model section" in _error(
        capsys, ["export", str(plan), "--to", "minicpm-config", out]
    )
