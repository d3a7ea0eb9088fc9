"""Whole tunnels: stages chained end to end against real MLflow, killed and resumed, reported,
reviewed in a real browser; the paper-scale dry run; clear errors for bad specs."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from helpers import tiny_overrides

from windtunnel.cli import main
from windtunnel.tunnel import STAGES, dry_run, load_tunnel, run_tunnel, status
from windtunnel.tunnel.render import size
from windtunnel.tunnel.runner import load_state

pytest_plugins = ["fixtures_mlflow"]

TINY = """
defaults:
  - tunnel_schema
  - launcher: local
  - _self_
tunnel:
  name: {name}
  dir: {dir}
  run: [train.tokens_per_param=4, train.eval_every_tokens=1024]
  mup_search:
    sweep: mup_search
    set: [model=micro_xxxs, sweep.n_trials=3, sweep.sampler.n_startup_trials=2, sweep.pruner.kind=none]
  lr_transfer:
    sweep: lr_transfer
    lr_factors: [0.5, 1.0, 2.0]
    set: ["sweep.space.width.choices=[micro_xxxs,micro_xxs]"]
  batch_size:
    sweep: batch_size
    set: ["sweep.space.size.choices=[micro_xxxs]", "sweep.space.batch.choices=[4,8,16]"]
  ladder:
    sweep: ladder
    set: ["sweep.space.size.choices=[micro_xxxs,micro_xxs,micro_xs,micro_s]", "train.branch_tokens_per_param=[1,2]"]
  fit: {{bootstrap: 20}}
  plan: {{budget_flops: 1.0e20, params: 3.0e4, tokens: 1.5e5, seq_len: 32, vocab_size: 300, batch_tokens: 256}}
  verify: {{enabled: true}}
"""


def _tiny_spec(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(TINY.format(name=name, dir=tmp / "tunnels"))
    return path


def _run_overrides(tmp: Path, srv) -> list[str]:
    base = [o for o in tiny_overrides(tmp) if not o.startswith(("tracker=", "model=", "run_dir="))]
    return [*base, "tracker=mlflow", f"tracker.home={srv.home}", f"tracker.port={srv.port}"]


@pytest.fixture(scope="module")
def tunnel_run(tmp_path_factory, mlflow_server):
    """A tiny tunnel whose driver is SIGKILLed during the ladder, then rerun to the end."""
    tmp = tmp_path_factory.mktemp("tunnel")
    spec = _tiny_spec(tmp, "tiny")
    cmd = [
        sys.executable,
        "-m",
        "windtunnel",
        "tunnel",
        str(spec),
        *_run_overrides(tmp, mlflow_server),
    ]
    env = {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp / "tunnels" / "tiny"
    deadline = time.monotonic() + 300
    killed_in = None
    while time.monotonic() < deadline and proc.poll() is None:
        if (folder / "state.json").is_file():
            state = load_state(folder / "state.json")
            runs = folder / "sweeps" / "ladder" / "runs"
            if state["stages"].get("ladder", {}).get("status") == "running" and any(
                runs.glob("*/result.json")
            ):
                killed_in = "ladder"
                break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.kill()
    proc.communicate()
    finished_before = {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
    t0 = time.monotonic()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    return {
        "tmp": tmp,
        "spec": spec,
        "cmd": cmd,
        "env": env,
        "folder": folder,
        "killed_in": killed_in,
        "finished_before": finished_before,
        "rerun_stderr": rerun.stderr,
        "rerun_seconds": time.monotonic() - t0,
        "summary": json.loads(rerun.stdout.strip().splitlines()[-1]),
        "srv": mlflow_server,
    }


def test_killed_tunnel_resumes_and_finishes_every_stage(tunnel_run) -> None:
    r = tunnel_run
    assert r["killed_in"] == "ladder"
    assert r["summary"]["done"] and [s["status"] for s in r["summary"]["stages"]] == ["done"] * 8
    err = r["rerun_stderr"]
    for stage in ("mup_search", "lr_transfer", "batch_size"):
        assert f"{stage}: done before, skipped" in err
    # the ladder's finished trials were kept, not retrained
    for path, mtime in r["finished_before"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was retrained"
    state = load_state(r["folder"] / "state.json")
    ladder = state["stages"]["ladder"]["result"]
    numbers = sorted(t["number"] for t in ladder["trials"])
    assert numbers == [0, 1, 2, 3] and all(t["state"] == "COMPLETE" for t in ladder["trials"])
    assert len(ladder["points"]) == 8  # 4 sizes × 2 decay branches


def test_stages_feed_each_other(tunnel_run) -> None:
    state = load_state(tunnel_run["folder"] / "state.json")
    st = {k: v["result"] for k, v in state["stages"].items()}
    best = st["mup_search"]["best_params"]
    assert set(best) == {"model.scale_emb", "model.init_std", "optim.lr", "model.scale_depth"}
    # the μTransfer grid is centred on the μP optimum
    lrs = sorted({t["params"]["lr"] for t in st["lr_transfer"]["trials"]})
    assert lrs == pytest.approx([best["optim.lr"] * f for f in (0.5, 1, 2)], rel=1e-3)
    # later stages train with the μP optimum
    cfg = json.loads(
        next((tunnel_run["folder"] / "sweeps/ladder/runs").glob("*/config.json")).read_text()
    )
    assert cfg["model"]["scale_emb"] == pytest.approx(best["model.scale_emb"])
    assert cfg["model"]["init_std"] == pytest.approx(best["model.init_std"])
    # the plan carries the μP hyperparameters and the fitted law's prediction
    plan_yaml = Path(st["plan"]["config"]).read_text()
    assert f"scale_emb: {best['model.scale_emb']}" in plan_yaml
    assert st["plan"]["loss"] > 0 and st["plan"]["N"] > 0
    # verify trained the planned run (its shape, in the proxies' family) and compared it
    v, plan = st["verify"], st["plan"]
    assert v["N"] == plan["N"] and v["D"] == round(plan["D"] / 256) * 256
    assert plan["shape"]["d_head"] == 16 and v["lo"] < v["predicted"] < v["hi"]
    assert len(v["observed"]) == 1 and 0 < v["observed"][0] < 10
    bt = st["backtest"]
    assert {p["N"] for p in bt["points"]} == {max(p["N"] for p in st["ladder"]["points"])}
    assert bt["min_extrapolation"] > 1


def test_report_and_mlflow_layout(tunnel_run) -> None:
    from mlflow.tracking import MlflowClient

    r = tunnel_run
    html = Path(r["summary"]["report"]["html"]).read_text()
    md = Path(r["summary"]["report"]["markdown"]).read_text()
    for text in ("μP", "Back-test", "tokens per parameter"):
        assert text.lower() in html.lower() and text.lower() in md.lower()
    assert html.count("data:image/png;base64,") >= 5
    client = MlflowClient(r["srv"].uri)
    for stage in ("mup_search", "lr_transfer", "batch_size", "ladder"):
        exp = client.get_experiment_by_name(f"tiny/{stage}")
        assert exp is not None, stage
        runs = client.search_runs([exp.experiment_id])
        assert any(x.data.tags.get("wt.kind") == "sweep" for x in runs)
        assert any(x.data.tags.get("mlflow.parentRunId") for x in runs)  # nested trials
    exp = client.get_experiment_by_name("tiny")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`wt.kind` = 'tunnel'")
    assert parent.info.status == "FINISHED"
    assert "backtest.max_abs_rel_error" in parent.data.metrics
    assert {"verify.rel_error", "verify.inside"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "report.md", "full_run.yaml"} <= artifacts
    # the resumed driver links the tunnel's own run page, not just the server
    from windtunnel.tracking import mlflow_ui_url

    expected = mlflow_ui_url(r["srv"].uri, exp.experiment_id, parent.info.run_id)
    assert r["summary"]["dashboard"] == expected


def test_rerun_of_a_finished_tunnel_redoes_nothing(tunnel_run) -> None:
    r = tunnel_run
    before = load_state(r["folder"] / "state.json")
    rerun = subprocess.run(r["cmd"], env=r["env"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = load_state(r["folder"] / "state.json")
    for stage in STAGES:
        assert f"{stage}: done before, skipped" in rerun.stderr
        assert after["stages"][stage]["seconds"] == before["stages"][stage]["seconds"]
    status = subprocess.run(
        [sys.executable, "-m", "windtunnel", "status", str(r["spec"])],
        capture_output=True,
        text=True,
        env=r["env"],
    )
    assert status.returncode == 0, status.stderr
    out = json.loads(status.stdout.strip().splitlines()[-1])
    assert out["done"] and out["report"]["html"].endswith("report.html")
    assert "backtest" in status.stderr and "held-out" in status.stderr


def test_changed_settings_of_a_finished_stage_are_refused(tunnel_run, capsys) -> None:
    r = tunnel_run
    overrides = _run_overrides(r["tmp"], r["srv"])
    code = main(["tunnel", str(r["spec"]), "tunnel.ladder.seeds=2", *overrides])
    assert code == 3
    assert "ladder already finished with other settings" in capsys.readouterr().err


def test_dashboard_chart_of_the_ladder_in_a_real_browser(tunnel_run) -> None:
    from conftest import skip_or_fail
    from mlflow.tracking import MlflowClient

    from windtunnel.tracking.browser import BrowserUnavailable, screenshot_charts

    r = tunnel_run
    client = MlflowClient(r["srv"].uri)
    exp = client.get_experiment_by_name("tiny/ladder")
    runs = client.search_runs([exp.experiment_id])
    trials = [x.info.run_id for x in runs if x.data.tags.get("wt.kind") != "sweep"]
    assert len(trials) == 4 + 8  # 4 trunks, 8 decay branches
    assert r["summary"]["charts"].startswith(r["srv"].uri) and trials[0] in r["summary"]["charts"]
    out = r["tmp"] / "ladder_charts.png"
    try:
        shot = screenshot_charts(r["srv"].uri, exp.experiment_id, out, run_ids=trials)
    except BrowserUnavailable as e:
        skip_or_fail(str(e))
    print(f"screenshot: {shot.path}")
    assert shot.lines >= 1 and out.stat().st_size > 20_000
    assert any("val_bpb" in t or "val_loss" in t for t in shot.titles)


def test_stage_alone_and_skips(tmp_path: Path) -> None:
    tf = load_tunnel(_tiny_spec(tmp_path, "alone"), ["tunnel.skip=[batch_size]"])
    assert not tf.enabled("batch_size") and tf.enabled("ladder")
    with pytest.raises(ValueError, match="stages are"):
        load_tunnel(_tiny_spec(tmp_path, "bad"), ["tunnel.skip=[ladderz]"])
    code = main(["tunnel", str(_tiny_spec(tmp_path, "alone")), "--stage", "fit"])
    assert code == 3  # the fit alone needs the ladder's points, and says so


def test_a_tunnel_is_named_by_position_not_as_an_experiment(capsys) -> None:
    assert main(["tunnel", "experiment=demo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "experiment= picks a train config" in err and "windtunnel tunnel demo" in err


def test_unknown_tunnel_lists_the_ready_ones(capsys) -> None:
    assert main(["tunnel", "nope"]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "minicpm_paper" in err


def test_paper_scale_dry_run_plans_without_running(tmp_path: Path, capsys) -> None:
    code = main(["tunnel", "minicpm_paper", f"tunnel.dir={tmp_path}", "--dry-run"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stages = {s["stage"]: s for s in out["stages"]}
    assert stages["mup_search"]["models"] == ["minicpm_9m"]
    assert stages["mup_search"]["jobs"] == stages["mup_search"]["trials"] // 4  # 4 per job
    assert "minicpm_0p5b" in stages["ladder"]["models"] and stages["ladder"]["trials"] == 7
    # resources per size: 9M and 30M packed two per job, 70M alone, 0.1B-0.5B on 8 GPUs each
    assert stages["ladder"]["gpus_per_trial"] == [1, 8] and stages["ladder"]["jobs"] == 1 + 1 + 4
    assert 0 < out["totals"]["wall_hours"] < out["totals"]["gpu_hours"]
    assert out["launcher"] == "slurm"
    assert 1e19 < out["totals"]["flops"] < 1e22 and out["totals"]["gpu_hours"] > 10
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_every_ready_tunnel_composes() -> None:
    for path in sorted((REPO / "tunnels").glob("*.yaml")):
        plan = dry_run(load_tunnel(path, []))
        assert plan.totals["trials"] > 0, path


def _md_sections(md: str) -> dict[str, str]:
    """The report's markdown by ``## `` section title."""
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


@pytest.mark.slow
def test_report_of_the_real_tunnel(tunnel_run) -> None:
    """The report as a user reads it, rendered by the real runner (driven through the public API:
    the finished tunnel is rerun, redoes nothing, and writes its report again) from what the
    stages really found: a headline per stage, each section backed by the run folders' own
    outputs, every plot a PNG, the plan's YAML linked and shown."""
    r = tunnel_run
    tf = load_tunnel(r["spec"], _run_overrides(r["tmp"], r["srv"]))
    before = status(tf)
    summary = run_tunnel(tf)
    folder = tf.folder
    # every stage done, with its headline; the rerun changed none of them
    assert summary["done"] and summary["tunnel"] == "tiny"
    assert [s["stage"] for s in summary["stages"]] == list(STAGES)
    assert all(s["status"] == "done" and s["headline"] for s in summary["stages"])
    assert summary["stages"] == before["stages"] == status(tf)["stages"]
    headlines = {s["stage"]: s["headline"] for s in summary["stages"]}
    out = {k: Path(v) for k, v in summary["report"].items()}
    assert out == {"html": folder / "report.html", "markdown": folder / "report.md"}
    page, md = out["html"].read_text(), out["markdown"].read_text()

    # the summary table: one row per stage with its headline, in both renderings
    sections = _md_sections(md)
    for stage, line in headlines.items():
        assert re.search(
            rf"^\| {stage} \| done \| [^|]+ \| [^|]+ \| {re.escape(_md_cell(line))} \|$", md, re.M
        )
        assert html.escape(line) in page, stage
    # a section per stage's result, none missing
    titles = [
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
    ]
    assert list(sections) == titles
    for title in titles:
        assert f"<h2>{html.escape(title)}</h2>" in page
    assert "Stages without a result" not in page

    # the ladder: what its run folders hold (4 sizes × 2 decay branches)
    branches: dict[str, list[dict]] = {}
    for run in sorted((folder / "sweeps/ladder/runs").glob("*/result.json")):
        model = json.loads((run.parent / "config.json").read_text())["model"]["name"]
        branches[model] = json.loads(run.read_text())["branches"]
    sizes = sorted(branches)
    assert sizes == ["micro_s", "micro_xs", "micro_xxs", "micro_xxxs"]
    assert headlines["ladder"] == f"8 points from 4 sizes ({', '.join(sizes)})"
    for b in (b for bs in branches.values() for b in bs):
        assert f" {b['val_bpb']:.4f} |" in sections["Ladder points"]
    # the back-test predicts the largest size's real points
    largest = max(branches, key=lambda m: branches[m][0]["N"])
    for b in branches[largest]:
        assert f"| {b['val_bpb']:.4f} |" in sections["Back-test"]
    errors = re.findall(r"\| ([-+]\d+\.\d\d)% \|", sections["Back-test"])
    assert len(errors) == len(branches[largest])
    worst = max(abs(float(e)) for e in errors)
    assert f"max |error| {worst:.2f}%" in headlines["backtest"]
    assert "Target met" in sections["Back-test"] or "Target not met" in sections["Back-test"]
    # verify: the planned run's own result file, against the prediction
    (run,) = (folder / "sweeps/verify/runs").glob("*/result.json")
    observed = json.loads(run.read_text())["branches"][-1]["val_bpb"]
    assert f"| 0 | {observed:.4f} |" in sections["Forward check of the plan"]
    assert f"bpb {observed:.4f} vs predicted" in headlines["verify"]

    # the μP optimum: its overrides are what the later stages trained with
    mup = sections["μP optimum"]
    best = re.search(r"^best (\d+\.\d{4}) with ", headlines["mup_search"])
    assert best and f"Best objective {best[1]} " in mup
    overrides = dict(o.split("=", 1) for o in re.search(r"```\n(.+)\n```", mup)[1].split())
    ladder_cfg = json.loads(next((folder / "sweeps/ladder/runs").glob("*/config.json")).read_text())
    for key in ("scale_emb", "init_std", "scale_depth"):
        assert ladder_cfg["model"][key] == pytest.approx(float(overrides[f"model.{key}"]))
    centre = re.search(
        r"centred on the μP optimum lr = (\S+)\.$", sections["μTransfer evidence"], re.M
    )
    assert centre and float(centre[1]) == pytest.approx(float(overrides["optim.lr"]), rel=1e-3)

    # the fit: its headline and table are the fit file's numbers
    fit = json.loads((folder / "fit/fit.json").read_text())["fit"]
    law = re.search(r"= (\S+) \+ (\S+)/N\^(\S+) \+ (\S+)/D\^(\S+);", headlines["fit"])
    assert law, headlines["fit"]
    for k, shown in zip(("E", "A", "B", "alpha", "beta"), law.group(1, 2, 4, 3, 5), strict=True):
        # A and B are shown to 3 significant digits: up to 0.5% off (1.62e18 for 1.6159e18)
        assert float(shown) == pytest.approx(fit[k], rel=5e-3, abs=1e-3), k
    assert "fitted to 8 points" in sections["Data–model law"]

    # the plan: its YAML file is named in the report, exists, and is shown in full
    yaml_path = folder / "plan" / "full_run.yaml"
    text = yaml_path.read_text()
    plan = yaml.safe_load(text)
    assert f"Experiment config ({yaml_path}):" in sections["Planned full run"]
    assert html.escape(str(yaml_path)) in page
    assert f"```yaml\n{text.rstrip()}\n```" in sections["Planned full run"]
    assert f"<pre><code>{html.escape(text)}</code></pre>" in page
    D = plan["train"]["tokens"]
    assert f"× {size(D)} tokens" in headlines["plan"] and f"({D:,})" in md
    assert plan["model"]["name"] == "tiny_full" and plan["model"]["scale_emb"] == pytest.approx(
        float(overrides["model.scale_emb"])
    )

    # plots: every figure a PNG in the tunnel folder, linked from the markdown, embedded in the HTML
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for link in links:
        p = folder / link
        assert not Path(link).is_absolute() and p.is_file(), link
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(links) and "plot missing" not in page
    assert {base64.b64decode(i) for i in images} == {(folder / x).read_bytes() for x in links}
    for title in ("μP optimum", "Data–model law", "Back-test", "Ladder points"):
        assert "![" in sections[title], f"no plot in {title}"
    for title, absent in (("μTransfer evidence", "skipped"), ("Batch-size law", "not fitted")):
        assert ("![" in sections[title]) != (absent in sections[title]), title
