"""Resources per trial: tiny proxies pack, larger rungs span ranks, chosen by model size."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from helpers import journal_counts, tiny_overrides

from windtunnel import checkpoint
from windtunnel.compose import compose_run
from windtunnel.launch.options import launcher_options
from windtunnel.sweep import load_sweep, run_sweep
from windtunnel.sweep.resources import apply_rule, model_params, ranks, rule_index, rule_launcher
from windtunnel.sweep.spec import ResourceRule

PACK = ResourceRule(max_params=10_000, launcher={"trials_per_job": 4})
SPAN = ResourceRule(run=["train.nproc_per_node=2", "train.parallel=fsdp"])


def test_the_first_rule_covering_a_size_wins() -> None:
    rules = [PACK, ResourceRule(max_params=1e6), SPAN]
    assert [rule_index(rules, n) for n in (5_968, 10_000, 10_001, 10**9)] == [0, 0, 1, 2]
    assert rule_index([PACK], 10**6) is None  # no rule: the sweep's own launcher


def test_a_rule_sets_the_launcher_and_the_run() -> None:
    cfg = compose_run(["model=micro_xxs"])
    assert model_params(cfg) == 23_712
    spanned = apply_rule(cfg, SPAN)
    assert spanned.train.nproc_per_node == 2 and spanned.train.parallel == "fsdp"
    assert apply_rule(cfg, PACK) is cfg
    local = launcher_options({"name": "local"})
    assert rule_launcher(local, PACK).trials_per_job == 4
    assert ranks(local, spanned) == 2 and ranks(local, cfg) == 1


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("[{max_params: 0},{max_params: 1000}]", "increasing, 0 \\(any size\\) last"),
        ("[{launcher: {partition: gpu}}]", "launcher.partition is not an option of launcher=local"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(tmp_path: Path, rules: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_sweep(
            REPO / "sweeps/smoke.yaml", [f"sweep.dir={tmp_path}", f"sweep.resources={rules}"]
        )


def test_a_ladder_packs_the_small_rung_and_spans_the_large_one_over_two_ranks(
    tmp_path: Path,
) -> None:
    spec = load_sweep(
        REPO / "sweeps/ladder.yaml",
        [
            f"sweep.dir={tmp_path}/sweeps",
            "launcher=local",
            "sweep.parallelism=1",
            "sweep.space.size.choices=[micro_xxxs,micro_xxs]",
            *tiny_overrides(tmp_path, "train.branch_tokens=[4096,8192]"),
        ],
    )
    spec.sweep.resources = [PACK, SPAN]
    summary = run_sweep(spec)
    assert summary.n_complete == 2, summary.failures
    runs = sorted((spec.folder / "runs").iterdir())
    sizes = {}
    for run in runs:
        meta = checkpoint.read_meta(run / "ckpt" / "fork-8192")
        sizes[meta["model_shape"]["d_model"]] = (meta["world_size"], meta["parallel"])
        for journal in run.rglob("journal.jsonl"):  # rank 0 alone records the trial
            assert set(journal_counts(journal).values()) == {1}
    assert sizes == {16: (1, "none"), 32: (2, "fsdp")}
