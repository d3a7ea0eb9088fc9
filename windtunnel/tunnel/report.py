"""The tunnel's report: one page (``report.html``, self-contained, and ``report.md``) per tunnel.

Built from the tunnel's state (what each stage found) and the PNGs the stages wrote. The page
is first assembled as plain blocks (paragraphs, tables, images, code), then rendered twice: HTML
with the images embedded as base64 data URIs, so that it is a single MLflow artifact, and
markdown that links the PNGs by their path relative to the tunnel folder.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
from pathlib import Path
from typing import Any

from windtunnel.tunnel.render import Block, duration
from windtunnel.tunnel.stages import STAGES

Section = tuple[str, list[Block]]
"""A titled part of the page."""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#1f2328;line-height:1.5}
h1{border-bottom:2px solid #d0d7de}h2{border-bottom:1px solid #d0d7de;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr:nth-child(even) td{background:#fbfcfd}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;border-radius:4px}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eaeef2}
figcaption{font-size:.85em;color:#57606a}.desc{color:#57606a}
"""


# -- assembling ----------------------------------------------------------------------------------


def _reason(state: dict[str, Any], stage: str, s: dict[str, Any]) -> str:
    """Why a stage has no result."""
    if s.get("error") or s.get("reason"):
        return str(s.get("error") or s.get("reason"))
    t = state.get("tunnel") or {}
    if stage in (t.get("skip") or []):
        return "listed in tunnel.skip"
    if (t.get(stage) or {}).get("enabled") is False:
        return f"tunnel.{stage}.enabled=false"
    return {
        "skipped": "not among the stages selected for this run",
        "running": "interrupted while running: rerun the tunnel to continue",
    }.get(s.get("status", ""), "not run yet")


RESULT_ERRORS = (KeyError, TypeError, ValueError, IndexError, StopIteration)
"""What a result that does not read back, or lacks what a section shows, raises."""


def build(state: dict[str, Any]) -> tuple[list[list[str]], list[Section]]:
    """The summary rows and the sections (title, blocks) of the page."""
    rows, missing, results = [], [], {}
    for stage in STAGES:
        s = state.get("stages", {}).get(stage.name) or {}
        st_ = s.get("status") or "pending"
        if st_ == "done":
            try:
                results[stage.name] = stage.load(s["result"])
                note = stage.headline(results[stage.name])
            except RESULT_ERRORS as e:
                note = f"(no headline: {type(e).__name__} {e})"
        else:
            note = _reason(state, stage.name, s)
            missing.append(f"{stage.name} — {st_}: {note}")
        rows.append([stage.name, st_, duration(s.get("seconds")), _cores(s), note])
    sections: list[Section] = []
    for stage in sorted(STAGES, key=lambda x: x.appendix):  # stable: registry order otherwise
        s = state.get("stages", {}).get(stage.name) or {}
        if s.get("status") != "done":
            continue
        for title in stage.titles:
            try:
                r = results[stage.name] if stage.name in results else stage.load(s["result"])
                sections.append((title, stage.section(r, title)))
            except RESULT_ERRORS as e:
                sections.append((title, [f"Could not show this result: {type(e).__name__} {e}"]))
    if missing:
        sections.append(("Stages without a result", [("list", missing)]))
    return rows, sections


def _cores(s: dict[str, Any]) -> str:
    """The share of the machine's cores a sweep stage kept busy (— where not measured)."""
    share = ((s.get("result") or {}).get("summary") or {}).get("core_busy")
    return f"{share:.0%}" if isinstance(share, (int, float)) else "—"


def _settings(state: dict[str, Any]) -> str:
    t = state.get("tunnel") or {}
    fit, plan = t.get("fit") or {}, t.get("plan") or {}
    if not fit and not plan:
        return ""
    return (
        f"Target {fit.get('target', 'bpb')}, {fit.get('form', 'chinchilla')} law, budget "
        f"{float(plan.get('budget_flops', 0)):.3g} FLOPs on {str(plan.get('gpu', '')).upper()} "
        f"at {float(plan.get('mfu', 0)):.0%} MFU."
    )


def _img_html(path: Path, caption: str) -> str:
    if not path.is_file():
        return f"<p><em>plot missing: {html.escape(str(path))}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{cap}">'
        f"<figcaption>{cap}</figcaption></figure>"
    )


def _html_block(b: Block) -> str:
    e = html.escape
    if isinstance(b, str):
        return f"<p>{e(b)}</p>"
    if b[0] == "list":
        return "<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>"
    if b[0] == "code":
        return f"<pre><code>{e(b[1])}</code></pre>"
    if b[0] == "img":
        return _img_html(b[1], b[2])
    head = "".join(f"<th>{e(h)}</th>" for h in b[1])
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_link(folder: Path, path: Path) -> str:
    """The PNG's path relative to the report; one outside the folder is copied to plots/."""
    folder, path = folder.resolve(), path.resolve()
    if not path.is_relative_to(folder):
        dst = folder / "plots" / path.name
        if path.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst)
        path = dst
    return Path(os.path.relpath(path, folder)).as_posix()


def _md_block(folder: Path, b: Block) -> str:
    if isinstance(b, str):
        return b
    if b[0] == "list":
        return "\n".join(f"- {x}" for x in b[1])
    if b[0] == "code":
        return f"```{b[2]}\n{b[1].rstrip()}\n```"
    if b[0] == "img":
        return f"![{b[2]}]({_md_link(folder, b[1])})"
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, b[1])) + " |", "|" + "---|" * len(b[1])]
    return "\n".join([*lines, *("| " + " | ".join(map(cell, r)) + " |" for r in b[2])])


def write_report(folder: Path, state: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` into ``folder``; return both."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = state.get("tunnel") or {}
    title = f"Wind tunnel: {t.get('name', folder.name)}"
    desc, settings = str(t.get("description") or ""), _settings(state)
    rows, sections = build(state)
    summary: Block = ("table", ["stage", "status", "time", "cores busy", "result"], rows)
    e = html.escape
    parts = [f"<h1>{e(title)}</h1>"]
    parts += [f'<p class="desc">{e(x)}</p>' for x in (desc, settings) if x]
    parts += ["<h2>Summary</h2>", _html_block(summary)]
    for name, blocks in sections:
        parts += [f"<h2>{e(name)}</h2>", *map(_html_block, blocks)]
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    md = [
        f"# {title}",
        *(x for x in (desc, settings) if x),
        "## Summary",
        _md_block(folder, summary),
    ]
    for name, blocks in sections:
        md += [f"## {name}", *(_md_block(folder, b) for b in blocks)]
    out = {"html": folder / "report.html", "markdown": folder / "report.md"}
    out["html"].write_text(page, encoding="utf-8")
    out["markdown"].write_text("\n\n".join(md) + "\n", encoding="utf-8")
    return out
