"""The tunnel's figures and report, from a realistic fake state (synthetic data, no training).

The report of a real tunnel, rendered by the runner, is checked in ``test_tunnel.py``
(``test_report_of_the_real_tunnel``), which shares that file's tiny tunnel run."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling import DataModelLaw
from windtunnel.scaling import plots as scaling_plots
from windtunnel.scaling.backtest import BacktestResult as ScalingBacktest
from windtunnel.scaling.backtest import Fold
from windtunnel.scaling.batch_lr import BatchSizeLaw, mutransfer_check
from windtunnel.scaling.bootstrap import BootstrapResult
from windtunnel.scaling.plan import make_plan
from windtunnel.sweep.driver import SweepSummary
from windtunnel.tunnel import plots
from windtunnel.tunnel.report import write_report
from windtunnel.tunnel.stages.backtest import BacktestResult, backtest_verdict, from_backtest
from windtunnel.tunnel.stages.batch_size import BatchSizeResult
from windtunnel.tunnel.stages.fit import FitResult
from windtunnel.tunnel.stages.ladder import LadderPoint, LadderResult, ladder_points
from windtunnel.tunnel.stages.lr_transfer import LrTransferResult
from windtunnel.tunnel.stages.mup_search import MupResult
from windtunnel.tunnel.stages.plan import PlanResult
from windtunnel.tunnel.stages.sweeps import TrialRecord
from windtunnel.tunnel.stages.verify import VerifyResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAW = DataModelLaw.from_minicpm(C_N=7.15e-2, C_D=3.00e-1, alpha=0.29, beta=0.23, L0=0.31)
SIZES = {"micro_xs": 2.0e5, "micro_s": 5.0e5, "micro_m": 1.2e6}


def _is_png(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC


def _mup_trials() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    out = []
    for n in range(12):
        state = "FAIL" if n == 5 else "PRUNED" if n in (3, 7, 9) else "COMPLETE"
        curve = {t: 3.2 - 0.3 * math.log10(t / 4096) + 0.1 * rng.random() for t in (4096, 8192)}
        out.append(
            {
                "number": n,
                "state": state,
                "params": {"lr": 10 ** rng.uniform(-3, -1), "scale_emb": 12.0},
                "value": 2.4 + 0.3 * rng.random() if state == "COMPLETE" else None,
                "intermediate": {} if state == "FAIL" else curve,
                "failure": "diverged: loss is nan" if state == "FAIL" else None,
            }
        )
    return out


def _ladder_trials(root: Path) -> list[dict[str, Any]]:
    """Finished ladder trials with a trunk journal and three decay branches each."""
    out = []
    for n, (name, N) in enumerate(SIZES.items()):
        run_dir = root / "runs" / f"ladder-t{n:04d}"
        run_dir.mkdir(parents=True)
        steps = np.geomspace(4096, 60 * N, 12).astype(int)
        lines = [{"ev": "start", "run_id": f"r{n}"}]
        for i, s in enumerate([0, *steps]):
            values = {"val_bpb": float(LAW.predict(N, max(s, 1000)) / math.log(2) / 3.5) + 0.02}
            values |= {"tokens": float(s)} if i % 2 else {}
            lines.append({"ev": "metrics", "step": int(s), "values": values})
        text = "\n".join(json.dumps(x) for x in lines) + '\n{"ev": "metr'  # a torn last line
        (run_dir / "journal.jsonl").write_text(text)
        branches = []
        for m in (10, 20, 40):
            D = int(m * N)
            loss = float(LAW.predict(N, D))
            branches.append(
                {
                    "tokens": D,
                    "N": int(N),
                    "D": D,
                    "flops": 6.0 * N * D,
                    "val_loss": loss,
                    "val_bpb": loss / math.log(2) / 3.5,
                    "domains": {},
                    "run_id": f"r{n}-{D}",
                }
            )
        out.append(
            {
                "number": n,
                "state": "COMPLETE",
                "params": {},
                "value": branches[-1]["val_bpb"],
                "intermediate": {},
                "failure": None,
                "run_dir": str(run_dir),
                "result": {"status": "finished", "N": int(N), "branches": branches},
                "config": {"model": {"name": name, "d_model": 64 * (n + 2)}},
            }
        )
    out.append({**out[0], "number": 3, "state": "FAIL", "result": None, "config": None})
    return out


def _backtest_table(extrapolation: float = 10.4) -> pd.DataFrame:
    """The largest of 3 sizes held out: 4 points, all inside their 90% intervals."""
    D = np.array([3e7, 6e7, 1.2e8, 1.8e8])
    observed = np.array([1.3579, 1.2676, 1.1796, 1.1380])
    rel = np.array([-0.0031, 0.0084, -0.0052, 0.0011])
    predicted = observed * (1 + rel)
    return pd.DataFrame(
        {
            "k": 2,
            "held_N": 3e6,
            "N": 3e6,
            "D": D,
            "C": 1.8e7 * D,
            "observed": observed,
            "predicted": predicted,
            "lo": predicted * 0.98,
            "hi": predicted * 1.02,
            "rel_error": rel,
            "extrapolation": extrapolation * D / D[0],
            "inside": True,
            "param_sd": 0.006,
            "noise_sd": 0.002,
            "flags": "",
        }
    )


def _backtested(extrapolation: float = 10.4) -> ScalingBacktest:
    """What :func:`windtunnel.scaling.backtest.backtest` returns for :func:`_backtest_table`."""
    t = _backtest_table(extrapolation)
    fold = Fold(
        fit_sizes=2, held_out=(3,), n_fit=6, c_max=float(t["C"].min() / extrapolation),
        law=LAW.to_dict(), warnings=(), flags=(), n_boot_ok=50, noise_sd=0.002,
        noise_source="residuals", seed_sd=0.0, seconds=0.1,
    )  # fmt: skip
    return ScalingBacktest(table=t, mode="largest", level=0.9, n_boot=50, folds=(fold,), n_sizes=3)


def _fit_summary() -> dict[str, Any]:
    """What ``json_summary`` gives for a 16-point chinchilla fit with a 1e21 budget."""
    alloc = {
        "C": 1e21,
        "N_opt": 1.679e9,
        "D_opt": 9.924e10,
        "tokens_per_param": 59.09,
        "loss": 0.4466,
        "a": 0.4708,
        "b": 0.5292,
    }
    intervals = {
        "E": [0.2185, 0.3231],
        "A": [19.51, 38.33],
        "B": [27.35, 41.14],
        "alpha": [0.2449, 0.3139],
        "beta": [0.2108, 0.2444],
        "a": [0.4048, 0.4969],
        "b": [0.5031, 0.5952],
        "C=1e+21": {
            "N_opt": [5.822e8, 2.613e9],
            "D_opt": [6.413e10, 2.876e11],
            "tokens_per_param": [24.81, 498.6],
            "loss": [0.4161, 0.4803],
        },
    }
    return {
        "form": "chinchilla",
        "target": "bpb",
        "E": 0.2691,
        "A": 23.78,
        "B": 37.63,
        "alpha": 0.2660,
        "beta": 0.2367,
        "a": 0.4708,
        "b": 0.5292,
        "intervals": intervals,
        "n_points": 9,
        "rms_log_residual": 0.0016,
        "warnings": ["E near its lower bound"],
        "allocation": {"1e+21": alloc},
        "bootstrap": {"seed": 0, "n_boot": 200, "n_failed": 2, "level": 0.95},
    }


def _fake_state(folder: Path) -> dict[str, Any]:
    """A finished tunnel: every stage done, with results shaped like the runner's."""
    pl, fit_dir = folder / "plots", folder / "fit"
    mup_trials = _mup_trials()
    mup = MupResult(
        summary=SweepSummary(
            study="mup_search",
            storage="journal:optuna.journal",
            n_trials=12,
            n_complete=8,
            n_pruned=3,
            n_failed=1,
            best_value=2.4123,
            best_params={"lr": 0.0123},
            best_trial=4,
            best_overrides=["optim.lr=0.0123"],
            parent_run_id="",
            tracking_uri="",
            folder=str(folder / "sweeps" / "mup_search"),
            failures={5: "diverged: loss is nan"},
        ),
        trials=[TrialRecord(**t) for t in mup_trials],
        best_value=2.4123,
        best_params={"optim.lr": 0.0123, "model.scale_emb": 12.0, "model.init_std": 0.0866},
        best_overrides=["optim.lr=0.0123", "model.scale_emb=12.0", "model.init_std=0.0866"],
        objective="val_bpb",
        plots=[str(plots.search_history(mup_trials, pl, "val_bpb"))],
    )
    lrs = [0.003, 0.006, 0.0123, 0.025, 0.05]
    lr_table = pd.DataFrame(
        [
            {
                "model": f"w{w}",
                "width": w,
                "lr": lr,
                "bpb": 1.2 + 0.05 * math.log(lr / 0.0123) ** 2 - w / 1e4,
            }
            for w in (128, 256, 512)
            for lr in lrs
        ]
    )
    check = mutransfer_check(lr_table, target="bpb")
    points = pd.DataFrame(
        {
            "level": [1.1, 1.2, 1.3],
            "group": [2e5, 2e5, 5e5],
            "bs_opt": [2.6e5, 1.6e5, 1.0e5],
            "tokens_opt": [3e7, 2e7, 1e7],
            "n_batch_sizes": 4,
            "centred": [True, True, False],
        }
    )
    law = BatchSizeLaw(k=3.1e5, gamma=6.2, points=points)
    ladder = _ladder_trials(folder / "sweeps" / "ladder")
    df = ladder_points(ladder)
    boot = BootstrapResult(
        samples=np.array([LAW.E, LAW.A, LAW.B, LAW.alpha, LAW.beta])
        * (1 + 0.02 * np.random.default_rng(1).standard_normal((60, 5))),
        seed=0,
        n_boot=60,
        n_failed=0,
        level=0.95,
        budgets=(1e21,),
    )
    fit_plots = [
        scaling_plots.loss_vs_compute(df, SimpleNamespace(law=LAW), fit_dir, target="bpb"),
        scaling_plots.bootstrap_distributions(boot, fit_dir, budget=1e21),
    ]
    fit_file = {"fit": {**LAW.to_dict(), "target": "bpb"}, "bootstrap": boot.to_dict()}
    plan = make_plan(fit_file, budget_flops=1e21, batch_law=law.to_dict(), name="demo_full")
    bt = _backtested()
    stages = {
        "mup_search": mup,
        "lr_transfer": LrTransferResult(
            table=lr_table.to_dict(orient="records"),
            mup_lr=0.0123,
            check=check.to_dict(),
            plots=[str(scaling_plots.lr_sweeps(lr_table, check, pl, target="bpb"))],
        ),
        "batch_size": BatchSizeResult(
            law={**law.to_dict(), "points": points.to_dict(orient="records")},
            plots=[str(scaling_plots.batch_size_law(law, pl))],
        ),
        "ladder": LadderResult(
            points=[LadderPoint(**r) for r in df.to_dict(orient="records")],
            plots=[str(plots.ladder_curves(ladder, pl, "bpb"))],
        ),
        "fit": FitResult(
            fit_file=str(fit_dir / "fit.json"),
            summary=_fit_summary(),
            plots=[str(p) for p in fit_plots],
        ),
        "plan": PlanResult(
            **vars(plan),
            config=str(folder / "plan" / "full_run.yaml"),
            yaml=plan.to_yaml(),
        ),
        "backtest": from_backtest(
            bt,
            df,
            target="bpb",
            target_error=0.01,
            plots=[str(scaling_plots.backtest_intervals(bt, pl, target="bpb"))],
        ),
        "verify": VerifyResult(
            N=147_600,
            D=6_774_784,
            seeds=[0],
            observed=[1.9012],
            predicted=1.8890,
            lo=1.8501,
            hi=1.9302,
            plan_loss=1.8885,
            extrapolation=1.4,
            noise_sd=0.004,
            run_ids=["run0"],
        ),
    }
    return {
        "tunnel": {
            "name": "demo",
            "description": "CPU micro tunnel <tiny> & fast",
            "skip": [],
            "fit": {"target": "bpb", "form": "chinchilla"},
            "plan": {"budget_flops": 1e21, "gpu": "h100", "mfu": 0.4},
        },
        "stages": {
            k: {"status": "done", "key": "k", "seconds": 12.5, "result": dataclasses.asdict(v)}
            for k, v in stages.items()
        },
    }


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Path]]:
    folder = tmp_path_factory.mktemp("tunnels") / "demo"
    state = json.loads(json.dumps(_fake_state(folder), default=str))  # as saved in state.json
    return folder, state, write_report(folder, state)


def test_plot_functions_write_pngs(tmp_path: Path) -> None:
    trials = _mup_trials()
    p = plots.search_history(trials, tmp_path, "val_bpb")
    assert p == tmp_path / "mup_search.png" and _is_png(p)
    assert _is_png(plots.search_history(trials, tmp_path / "max", "acc", direction="maximize"))
    assert _is_png(plots.search_history([trials[5]], tmp_path / "failed", "val_bpb"))
    p = plots.ladder_curves(_ladder_trials(tmp_path / "ladder"), tmp_path, "loss")
    assert p == tmp_path / "ladder_curves.png" and _is_png(p)
    p = scaling_plots.backtest_intervals(_backtested(), tmp_path, target="bpb")
    assert p == tmp_path / "backtest.png" and _is_png(p)


def test_report_has_every_section_and_number(full: tuple[Path, dict, dict]) -> None:
    folder, state, out = full
    assert out == {"html": folder / "report.html", "markdown": folder / "report.md"}
    page, md = out["html"].read_text(), out["markdown"].read_text()
    for text in (page, md):
        for title in (
            "Summary",
            "μP optimum",
            "μTransfer evidence",
            "Batch-size law",
            "Data–model law",
            "Compute-optimal ratio",
            "Planned full run",
            "Back-test",
            "Forward check of the plan",
            "Ladder points",
        ):
            assert f"{title}</h2>" in text or f"## {title}\n" in text, title
        assert "Stages without a result" not in text
        assert "max |error| 0.84%" in text and "+0.84%" in text  # back-test, signed per point
        assert "10.4–62.4×" in text and "Target met" in text
        assert "largest: 4 held-out points, 90% coverage 4/4, max " in text  # summary row
        assert "Coverage: 4 of 4 held-out points (100%) lie inside their 90%" in text
        assert "[1.3266, 1.3808]" in text  # the first point's interval
        assert "59.1 tokens per parameter (95% interval 24.8–498.6)" in text  # ratio + interval
        assert "[0.2449, 0.3139]" in text  # alpha's bootstrap interval
        assert "bs_opt(L) = 3.1e+05 / L^6.2" in text
        assert "optim.lr=0.0123 model.scale_emb=12.0" in text
        assert "8 complete, 3 pruned, 1 failed" in text and "| 12 s |" in md
        assert "1.1380" in text  # observed back-test value with its 4 decimals
        assert "H100-hours" in text and f"{state['stages']['plan']['result']['N']:,}" in text
        assert "9 points from 3 sizes" in text
        assert "bpb 1.9012 vs predicted 1.8890 [1.8501, 1.9302] — inside the 90% interval" in text
        assert "error +0.65%; the ladder" in text and "seed noise is ±0.40%" in text
        assert "μTransfer stable: lr_opt ∝ width^" in text  # 5 lrs ×2 apart over 4× widths
        assert "The design this verdict needs:" in text
    assert "# @package _global_" in md and "```yaml" in md
    assert "<pre><code># @package _global_" in page
    assert "CPU micro tunnel &lt;tiny&gt; &amp; fast" in page and "<tiny>" not in page


def test_html_is_self_contained(full: tuple[Path, dict, dict]) -> None:
    _, state, out = full
    page = out["html"].read_text()
    n_plots = sum(len(s["result"].get("plots", [])) for s in state["stages"].values())
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == n_plots == 7
    assert all(base64.b64decode(i)[:8] == PNG_MAGIC for i in images)
    assert "plot missing" not in page and 'src="http' not in page and "<link" not in page


def test_markdown_links_plots_relative(full: tuple[Path, dict, dict]) -> None:
    folder, _, out = full
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", out["markdown"].read_text())
    assert "plots/mup_search.png" in links and "fit/bootstrap.png" in links
    assert all(not Path(x).is_absolute() and _is_png(folder / x) for x in links)


def test_plot_outside_the_folder_is_copied(tmp_path: Path) -> None:
    elsewhere = scaling_plots.backtest_intervals(_backtested(), tmp_path / "elsewhere")
    state = {
        "tunnel": {"name": "t"},
        "stages": {
            "backtest": {
                "status": "done",
                "result": dataclasses.asdict(
                    BacktestResult(
                        max_abs_rel_error=0.0084,
                        min_extrapolation=10.4,
                        target_error=0.01,
                        points=_backtest_table().to_dict(orient="records"),
                        plots=[str(elsewhere)],
                    )
                ),
            }
        },
    }
    out = write_report(tmp_path / "t", state)
    assert "![back-test: backtest.png](plots/backtest.png)" in out["markdown"].read_text()
    assert _is_png(tmp_path / "t" / "plots" / "backtest.png")


def test_skipped_and_failed_stages_render_with_reasons(tmp_path: Path) -> None:
    state = {
        "tunnel": {
            "name": "partial",
            "description": "",
            "skip": ["batch_size"],
            "fit": {"enabled": True},
            "plan": {"enabled": False},
        },
        "stages": {
            "mup_search": {"status": "skipped"},
            "lr_transfer": {
                "status": "done",
                "seconds": 3.0,
                "result": dataclasses.asdict(
                    LrTransferResult(
                        check={"skipped": "the μTransfer check needs lr sweeps at ≥2 widths"}
                    )
                ),
            },
            "batch_size": {"status": "skipped"},
            "ladder": {"status": "running", "key": "k"},
            "fit": {
                "status": "failed",
                "key": "k",
                "error": "TunnelError: the fit needs the ladder's points: run the ladder stage first",
            },
            "plan": {"status": "skipped"},
        },
    }
    out = write_report(tmp_path / "partial", state)
    for text in (out["html"].read_text(), out["markdown"].read_text()):
        assert "Stages without a result" in text
        assert "mup_search — skipped: not among the stages selected" in text
        assert "batch_size — skipped: listed in tunnel.skip" in text
        assert "plan — skipped: tunnel.plan.enabled=false" in text
        assert "ladder — running: interrupted" in text
        assert "the fit needs the ladder" in text and "backtest — pending: not run yet" in text
        assert "μTransfer check skipped: the μTransfer check needs lr sweeps" in text  # headline
        assert "The μTransfer check was skipped" in text
        assert "<h2>Back-test" not in text and "## Back-test" not in text
    assert "data:image/png" not in out["html"].read_text()


def test_backtest_verdict_says_which_part_missed() -> None:
    r = BacktestResult(max_abs_rel_error=0.0084, target_error=0.01, min_extrapolation=12.0)
    assert backtest_verdict(r).startswith("Target met")
    short = backtest_verdict(dataclasses.replace(r, min_extrapolation=2.1))
    assert "Target not met" in short and "only 2.1×" in short and "error" not in short.split(":")[1]
    big = backtest_verdict(dataclasses.replace(r, max_abs_rel_error=0.023))
    assert "2.30% is above 1.00%" in big and "only" not in big
    both = backtest_verdict(dataclasses.replace(r, max_abs_rel_error=0.023, min_extrapolation=2.1))
    assert "2.30% is above 1.00%" in both and "only 2.1×" in both


def test_results_read_back_into_their_dataclasses(full: tuple[Path, dict, dict]) -> None:
    """state.json keeps ``asdict(result)``; every stage reads it back to the same layout."""
    from windtunnel.tunnel.stages import NAMES, STAGES

    _, state, _ = full
    assert tuple(state["stages"]) == NAMES
    for stage in STAGES:
        raw = state["stages"][stage.name]["result"]
        result = stage.load(raw)
        assert isinstance(result, stage.result_type)
        assert json.loads(json.dumps(stage.dump(result), default=str)) == raw, stage.name
    with pytest.raises(ValueError, match="unknown config key"):
        STAGES[-1].load({**state["stages"]["backtest"]["result"], "extra": 1})


def test_state_is_versioned(tmp_path: Path, full: tuple[Path, dict, dict]) -> None:
    from windtunnel.schema import SchemaError
    from windtunnel.tunnel.runner import (
        STATE_VERSION,
        TunnelError,
        check_results,
        load_state,
        save_state,
        summarize,
    )

    _, state, _ = full
    path = tmp_path / "t" / "state.json"
    path.parent.mkdir()
    path.write_text(json.dumps(state))  # no version: written before states had one
    old = load_state(path)
    assert old["version"] == STATE_VERSION == 1
    check_results(old, path)
    rows = {r["stage"]: r for r in summarize(old, path.parent)["stages"]}
    assert rows["ladder"]["headline"] == "9 points from 3 sizes (micro_m, micro_s, micro_xs)"
    save_state(path, old)
    assert json.loads(path.read_text())["version"] == STATE_VERSION
    path.write_text(json.dumps({**state, "version": STATE_VERSION + 1}))
    with pytest.raises(SchemaError, match=r"field version: a version-2 tunnel state.*delete .* or"):
        load_state(path)
    bad = json.loads(json.dumps(state))
    bad["stages"]["fit"]["result"]["chi2"] = 1.0
    with pytest.raises(TunnelError, match="the fit result is not one this windtunnel reads"):
        check_results(bad, path)


def _plan_state(tmp_path: Path, plan: Any) -> dict[str, Any]:
    result = PlanResult(**vars(plan), config=str(tmp_path / "full_run.yaml"), yaml=plan.to_yaml())
    done = {"status": "done", "key": "k", "seconds": 0.1, "result": dataclasses.asdict(result)}
    return json.loads(json.dumps({"tunnel": {"name": "t"}, "stages": {"plan": done}}, default=str))


MICRO_RANGE = {"N": [6e3, 1.9e5], "D": [6e4, 7.6e6], "C": [2.2e9, 8.6e12],
               "tokens_per_param": [10.0, 40.0]}  # fmt: skip


def test_plan_warnings_show_next_to_the_plan(tmp_path: Path) -> None:
    """A plan 1e8x beyond its fit reads as flagged, in the summary and next to the plan."""
    fit_file = {"fit": {**LAW.to_dict(), "target": "bpb"}, "data_range": MICRO_RANGE,
                "batch_size_law": {"k": 1e5, "gamma": 8.0, "loss_range": [2.1, 2.9]}}  # fmt: skip
    plan = make_plan(fit_file, budget_flops=1e21, name="t_full")
    out = write_report(tmp_path / "t", _plan_state(tmp_path, plan))
    md, page = out["markdown"].read_text(), out["html"].read_text()
    head = re.search(r"^\| plan \| done \| [^|]+ \| (.+) \|$", md, re.M)
    assert (
        head
        and "4 WARNINGS (no_interval, extrapolation, tokens_per_param, batch_law_range)"
        in (head[1])
    )
    section = md[md.index("## Planned full run") : md.index("Experiment config")]
    assert (
        "- WARNING (extrapolation): compute 6ND = 1e+21 is 1.2e+08x the largest fitted" in section
    )
    assert "fit a ladder closer to this budget" in section  # what to do
    assert "WARNING (batch_law_range)" in page and "# WARNING (extrapolation)" in md  # + YAML


def test_refused_plan_is_reported_not_raised(tmp_path: Path) -> None:
    fit_file = {"fit": {**LAW.to_dict(), "target": "bpb"}, "data_range": MICRO_RANGE}
    plan = make_plan(fit_file, params=1e8, tokens=1e9, batch_tokens=2e7, refuse=False)
    md = write_report(tmp_path / "t", _plan_state(tmp_path, plan))["markdown"].read_text()
    assert "plan REFUSED (steps): 109M params × 1B tokens in 49 optimizer steps" in md
    section = md[md.index("## Planned full run") :]
    assert section.index("- REFUSED (steps): the plan has 49") < section.index("- WARNING")
    assert "# @package _global_\n# REFUSED (steps)" in md


def test_results_from_before_the_checks_still_load_and_say_more() -> None:
    """state.json of an older windtunnel: no verdict in lr_transfer, no warnings in the plan."""
    from windtunnel.tunnel.stages import lr_transfer, plan

    bpb = {32: (3.2994, 2.9059, 3.3517), 48: (2.5429, 2.4196, 2.5607), 64: (2.218, 2.1464, 2.39)}
    old_lr = {
        "summary": None, "trials": [], "plots": [], "mup_lr": 0.01605,
        "table": [{"model": f"m{w}", "width": w, "lr": lr, "bpb": y}
                  for w, ys in bpb.items() for lr, y in zip((0.004013, 0.01605, 0.06421), ys)],
        "check": {"slope": -0.452, "spread": 1.4, "stable": False, "table": []},
    }  # fmt: skip
    r = lr_transfer.STAGE.load(old_lr)
    line = lr_transfer.STAGE.headline(r)
    assert line.startswith("μTransfer: cannot tell at this resolution (lr_opt ∝ width^-0.45;")
    assert "lrs per width 3 (need ≥ 5)" in line and "width range ×2 (need ≥ ×4)" in line
    text = str(lr_transfer.STAGE.section(r, "μTransfer evidence"))
    assert "The design this verdict needs:" in text and "'lr spacing', '×4', '≤ ×2', 'no'" in text
    new = dataclasses.asdict(
        make_plan({"fit": {**LAW.to_dict(), "target": "bpb"}}, params=1e9, batch_tokens=4e6)
    )
    old_plan = {k: v for k, v in new.items()
                if k not in ("warnings", "steps", "tokens_per_param_interval")}  # fmt: skip
    old_plan |= {"notes": ["WARNING: compute 6ND = 1e+21 is 1.2e+08x the largest fitted"],
                 "config": "full_run.yaml", "yaml": ""}  # fmt: skip
    p = plan.STAGE.load(old_plan)
    assert p.warnings == [] and p.steps == 0
    assert plan.STAGE.headline(p).endswith("— 1 WARNING (extrapolation)")
