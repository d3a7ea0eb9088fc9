"""A real-browser look at the MLflow dashboard: open an experiment's chart page in headless
Chromium (Debian's ``chromium`` driven by Playwright from PyPI), wait until a loss curve is drawn,
and save a screenshot.

MLflow 3.x draws its run charts with plotly: every plotted trace is an SVG ``path.js-line``,
whose ``d`` attribute holds the line's segments once the metric history has been fetched and
drawn. Chart cards outside the viewport are not rendered at all, hence the tall viewport.
Playwright is imported only inside :func:`screenshot_charts`; no browser download is needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from windtunnel.tracking.server import mlflow_ui_url

if TYPE_CHECKING:
    from playwright.sync_api import Page

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
LINE_SELECTOR = "path.js-line"
"""A plotly trace's line; MLflow's run charts are plotly scatter plots."""
CARD_TITLE_SELECTOR = '[data-testid="experiment-view-compare-runs-card"] h4'
EXPANDER_SELECTOR = 'button[data-component-id*="runnamecellrenderer"]'
"""The [+] in a parent run's name cell, which shows its nested runs (decay branches)."""
ASSISTANT_CLOSE_SELECTOR = '[data-component-id="mlflow.assistant.chat_panel.close"]'
_COUNT_DRAWN_JS = f"""() => [...document.querySelectorAll('{LINE_SELECTOR}')]
    .filter(p => /[LCQSTAHV]/i.test(p.getAttribute('d') || '')).length"""
_RUN_ID = re.compile(r"[A-Za-z0-9_-]+")


class BrowserUnavailable(RuntimeError):
    """Headless Chromium or Playwright is missing or cannot start on this machine."""


@dataclass
class ChartShot:
    """What :func:`screenshot_charts` saw."""

    path: Path
    """The full-page PNG."""
    lines: int
    """Plotted lines drawn (``path.js-line`` elements with at least one segment)."""
    titles: list[str] = field(default_factory=list)
    """Titles of the chart cards shown (the metric names)."""
    url: str = ""


def chromium_path() -> str:
    """The Chromium binary: ``$WINDTUNNEL_CHROMIUM``, else Debian's ``/usr/bin/chromium``
    (or a ``chromium`` on PATH). Raises :class:`BrowserUnavailable` with the fix when absent."""
    wanted = os.environ.get("WINDTUNNEL_CHROMIUM") or DEFAULT_CHROMIUM
    candidates = [wanted if os.sep in wanted else shutil.which(wanted)]
    if "WINDTUNNEL_CHROMIUM" not in os.environ:
        candidates.append(shutil.which("chromium"))
    for found in candidates:
        if found and Path(found).is_file() and os.access(found, os.X_OK):
            return found
    raise BrowserUnavailable(
        f"headless Chromium not found at {wanted}: install it with `apt-get install "
        "chromium` (scripts/install.sh does this when run as root or with passwordless "
        "sudo), or set WINDTUNNEL_CHROMIUM to a Chromium/Chrome binary"
    )


def chart_url(tracking_uri: str, experiment_id: str, run_ids: list[str] | None = None) -> str:
    """The experiment's chart page; with ``run_ids`` only those runs, listed flat (a search
    filter plus a non-date sort keeps MLflow from nesting them under their parents)."""
    url = mlflow_ui_url(tracking_uri, experiment_id)
    if run_ids:
        bad = [r for r in run_ids if not _RUN_ID.fullmatch(r)]
        if bad:
            raise ValueError(f"not MLflow run ids: {bad}")
        ids = ", ".join(f"'{r}'" for r in run_ids)
        url += f"&searchFilter={quote(f'attributes.run_id IN ({ids})')}"
        url += "&orderByKey=attributes.run_name&orderByAsc=true"
    return url


def screenshot_charts(
    tracking_uri: str,
    experiment_id: str,
    out: Path,
    *,
    run_ids: list[str] | None = None,
    timeout_s: float = 60,
    viewport: tuple[int, int] = (1600, 3000),
) -> ChartShot:
    """Open the chart page of experiment ``experiment_id`` in headless Chromium, wait until a
    plotted line is drawn, save a full-page PNG to ``out`` and report what was drawn.

    Without ``run_ids`` every top-level run is expanded so its nested runs (WSD decay branches)
    are charted too. Raises :class:`BrowserUnavailable` when Playwright or Chromium is missing,
    ``RuntimeError`` when no line is drawn within ``timeout_s``.
    """
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise BrowserUnavailable(
            f"playwright is not importable ({e}): install the dev extras "
            "(`pip install -e '.[dev]'`, or run scripts/install.sh); no browser download is "
            "needed, it drives Debian's chromium"
        ) from e
    exe = chromium_path()
    url = chart_url(tracking_uri, experiment_id, run_ids)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s

    def left_ms() -> float:
        return max(1000.0, (deadline - time.monotonic()) * 1000)

    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(
                executable_path=exe, headless=True, args=list(CHROMIUM_ARGS)
            )
        except PlaywrightError as e:
            raise BrowserUnavailable(f"Chromium at {exe} did not start: {e}") from e
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            try:
                page.goto(url, timeout=left_ms())
            except PlaywrightError as e:
                raise RuntimeError(
                    f"could not open {url} ({e}): is the MLflow server up? "
                    "(`windtunnel server status`)"
                ) from e
            try:
                page.wait_for_function(f"() => ({_COUNT_DRAWN_JS})() > 0", timeout=left_ms())
            except PlaywrightError as e:
                page.screenshot(path=str(out), full_page=True)
                raise RuntimeError(
                    f"no chart line drawn within {timeout_s:g} s at {url} (screenshot: {out}): "
                    "check the experiment id and that its runs logged metrics"
                ) from e
            _tidy(page, expand=not run_ids)
            lines = _settle(page, deadline)
            titles = [
                (h.get_attribute("title") or h.inner_text()).strip()
                for h in page.locator(CARD_TITLE_SELECTOR).all()
            ]
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return ChartShot(path=out, lines=lines, titles=[t for t in titles if t], url=url)


def _tidy(page: Page, *, expand: bool) -> None:
    """Close the assistant side panel (more room for charts) and expand parent runs."""
    from playwright.sync_api import Error as PlaywrightError

    closer = page.locator(ASSISTANT_CLOSE_SELECTOR)
    if closer.count():
        with contextlib.suppress(PlaywrightError):  # cosmetic only
            closer.first.click(timeout=2000)
    if expand:
        for button in page.locator(EXPANDER_SELECTOR).all():
            button.click(timeout=5000)


def _settle(page: Page, deadline: float, *, quiet_s: float = 1.5) -> int:
    """Wait until the number of drawn lines stops changing for ``quiet_s`` (or the deadline);
    return it."""
    count = page.evaluate(_COUNT_DRAWN_JS)
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        now = page.evaluate(_COUNT_DRAWN_JS)
        if now != count:
            count, stable_since = now, time.monotonic()
    return int(count)
