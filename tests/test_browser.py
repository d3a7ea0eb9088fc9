"""The MLflow dashboard in a real browser: a tunnel's runs, trained into a real MLflow server,
open on the chart page in headless Chromium with their loss curves drawn (screenshot kept)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import skip_or_fail
from helpers import tiny_overrides

from windtunnel.compose import compose_run as compose
from windtunnel.tracking.browser import (
    BrowserUnavailable,
    chart_url,
    chromium_path,
    screenshot_charts,
)
from windtunnel.train import train

pytest_plugins = ["fixtures_mlflow"]

EXPERIMENT = "wt-browser-tests"


def _require_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        skip_or_fail(f"playwright is not installed ({e}): pip install -e '.[dev]'")
    try:
        chromium_path()
    except BrowserUnavailable as e:
        skip_or_fail(str(e))


def test_missing_chromium_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINDTUNNEL_CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(BrowserUnavailable, match=r"apt-get install chromium.*install\.sh"):
        chromium_path()


def test_chart_url_lists_only_the_given_runs() -> None:
    url = chart_url("http://h:1/", "7", ["abc123", "def456"])
    assert url.startswith("http://h:1/#/experiments/7/runs?compareRunsMode=CHART&searchFilter=")
    assert "abc123" in url and "orderByKey=attributes.run_name" in url
    with pytest.raises(ValueError, match="run ids"):
        chart_url("http://h:1", "7", ["x' OR '1"])


@pytest.mark.integration
@pytest.mark.slow
def test_dashboard_draws_the_tunnels_loss_chart(tmp_path: Path, mlflow_server) -> None:
    from mlflow import MlflowClient

    _require_browser()
    base = [o for o in tiny_overrides(tmp_path) if o != "tracker=jsonl"]
    cfg = compose(
        [
            *base,
            "tracker=mlflow",
            f"tracker.uri={mlflow_server.uri}",
            f"tracker.experiment={EXPERIMENT}",
            "train.branch_tokens=[4096,8192]",
        ]
    )
    result = train(cfg)
    assert result.status == "finished" and len(result.points) == 2
    experiment_id = MlflowClient(mlflow_server.uri).get_experiment_by_name(EXPERIMENT).experiment_id

    png = tmp_path / "mlflow-charts.png"
    try:
        shot = screenshot_charts(mlflow_server.uri, experiment_id, png, timeout_s=45)
    except BrowserUnavailable as e:
        skip_or_fail(str(e))
    print(f"MLflow chart screenshot: {shot.path} ({shot.lines} lines, charts {shot.titles})")
    assert shot.lines >= 1
    assert "val_loss" in shot.titles and "train/loss" in shot.titles
    assert any(("val" in t or "loss" in t or "bpb" in t) for t in shot.titles)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
