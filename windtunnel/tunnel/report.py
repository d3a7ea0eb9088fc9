"""The tunnel's report: one page (``report.html``, self-contained, and ``report.md``) per tunnel.

Built from the tunnel's state (what each stage found) and the PNGs the stages wrote. The page
is first assembled as plain blocks (paragraphs, tables, images, code), then rendered twice: HTML
with the images embedded as base64 data URIs, so that it is a single MLflow artifact, and
markdown that links the PNGs by their path relative to the tunnel folder.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
from pathlib import Path
from typing import Any

from windtunnel.tunnel.plots import extrapolation_span, si
from windtunnel.tunnel.spec import STAGES

TARGET_EXTRAPOLATION = 10.0
"""The back-test's goal is the target error at ≥ this many times the largest fitted compute."""

Block = str | tuple[Any, ...]
"""A paragraph (str), ``("table", headers, rows)``, ``("img", path, caption)``,
``("code", text, lang)`` or ``("list", items)``."""

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


# -- formatting ---------------------------------------------------------------------------------


def _num(x: Any, digits: int = 4) -> str:
    """A number as people read it: 4 significant digits, scientific when large or tiny."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not isinstance(x, (int, float)):
        return str(x)
    if not math.isfinite(x):
        return "—"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _iv(iv: Any, fmt: Any = _num) -> str:
    return f"[{fmt(iv[0])}, {fmt(iv[1])}]" if iv and len(iv) == 2 else "—"


def _pct(x: float) -> str:
    return f"{x:.2%}"


def _spct(x: float) -> str:
    return f"{x:+.2%}"


def _size(x: Any) -> str:
    """Parameters or tokens: ``1.2e8`` → ``120M``."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return si(x) if ok else _num(x)


def _loss(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else _num(x)


def _duration(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


FORMATS: dict[str, Any] = {
    **dict.fromkeys(("N", "D", "bs_opt", "tokens_opt", "group"), _size),
    **dict.fromkeys(("observed", "predicted", "loss", "bpb", "loss_opt"), _loss),
    "rel_error": _spct,
    "extrapolation": lambda x: f"{x:.1f}×",
    "ratio": lambda x: f"{x:.1f}",
    "C": lambda x: f"{x:.3g}",
    "model": str,
}
"""How a table column is formatted, by key (default :func:`_num`)."""


def _table(headers: str, recs: list[dict[str, Any]], keys: str) -> Block:
    """A table block: ``headers`` split on ``|``, one row per record of its ``keys``' values."""
    fmt = lambda k, v: _num(v) if v is None else FORMATS.get(k, _num)(v)  # noqa: E731
    rows = [[fmt(k, rec.get(k)) for k in keys.split()] for rec in recs]
    return ("table", headers.split("|"), rows)


def _plots(r: dict[str, Any], caption: str) -> list[Block]:
    return [("img", Path(p), f"{caption}: {Path(p).name}") for p in r.get("plots") or []]


# -- one section per stage ------------------------------------------------------------------------


def _mup(r: dict[str, Any]) -> list[Block]:
    s = r.get("summary") or {}
    out: list[Block] = [
        f"Best objective {_loss(r['best_value'])} (trial #{s.get('best_trial')}) of "
        f"{s.get('n_trials', len(r.get('trials', [])))} trials: {s.get('n_complete', 0)} "
        f"complete, {s.get('n_pruned', 0)} pruned, {s.get('n_failed', 0)} failed.",
        ("table", ["parameter", "optimum"], [[k, _num(v)] for k, v in r["best_params"].items()]),
        "Every later sweep ran with these overrides:",
        ("code", " ".join(r.get("best_overrides") or []), ""),
    ]
    fails = list((s.get("failures") or {}).items())
    if fails:
        out.append("Failed trials (first 5):")
        out.append(("list", [f"#{k}: {v}" for k, v in fails[:5]]))
    return out + _plots(r, "search history")


def _lr_transfer(r: dict[str, Any]) -> list[Block]:
    c = r.get("check") or {}
    out: list[Block] = []
    if r.get("mup_lr"):
        out.append(f"The lr grid is centred on the μP optimum lr = {_num(r['mup_lr'])}.")
    if "slope" not in c:
        return [*out, f"The μTransfer check was skipped: {c.get('skipped', 'no result')}."]
    verdict = "stable: μP transfers the lr" if c["stable"] else "NOT stable"
    out += [
        f"{len(r.get('table') or [])} finished runs. The optimal lr moves with width as "
        f"width^{c['slope']:+.3f} (0 under perfect transfer, −1 like standard "
        f"parametrization); the optima lie within ×{c['spread']:.2f} of each other: {verdict}.",
        _table(
            "width|lr_opt|target at lr_opt|lrs swept|optimum inside the grid",
            c.get("table") or [],
            "width lr_opt loss_opt n_lrs interior",
        ),
    ]
    return out + _plots(r, "lr sweeps per width")


def _batch_size(r: dict[str, Any]) -> list[Block]:
    law = r.get("law") or {}
    if "k" not in law:
        return [f"The batch-size law was not fitted: {law.get('skipped', 'no result')}."]
    out: list[Block] = [
        f"bs_opt(L) = {law['k']:.3g} / L^{law['gamma']:.3g} tokens per step (MiniCPM found "
        "1.21e9 / L^6.24 with L in nats on their data)."
    ]
    pts = law.get("points") or []
    if pts:
        out.append(
            _table(
                "iso-loss level|group (N)|bs_opt (tokens)|tokens to reach|centred",
                pts,
                "level group bs_opt tokens_opt centred",
            )
        )
    return out + _plots(r, "batch-size law")


def _budget(s: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The fit's first budget: its key, allocation and bootstrap intervals."""
    key, alloc = next(iter(s["allocation"].items()))
    return key, alloc, (s.get("intervals") or {}).get(f"C={key}") or {}


def _fit(r: dict[str, Any]) -> list[Block]:
    s = r["summary"]
    iv, boot = s.get("intervals") or {}, s.get("bootstrap") or {}
    level = f"{boot.get('level') or 0.95:.0%}"
    _, alloc, civ = _budget(s)
    out: list[Block] = [
        f"{s['target']} = E + A/N^α + B/D^β ({s.get('form', 'chinchilla')} form) fitted to "
        f"{s.get('n_points')} points; rms log residual {_num(s.get('rms_log_residual'))}; "
        f"{level} intervals from {boot.get('n_boot')} bootstrap refits "
        f"({boot.get('n_failed', 0)} failed, seed {boot.get('seed')}).",
        (
            "table",
            ["parameter", "estimate", f"{level} interval"],
            [[k, _num(s[k]), _iv(iv.get(k))] for k in ("E", "A", "B", "alpha", "beta", "a", "b")],
        ),
        f"The compute-optimal allocation at C = {alloc['C']:.3g} FLOPs:",
        (
            "table",
            ["quantity", "value", f"{level} interval"],
            [
                ["N_opt (parameters)", _size(alloc["N_opt"]), _iv(civ.get("N_opt"), _size)],
                ["D_opt (tokens)", _size(alloc["D_opt"]), _iv(civ.get("D_opt"), _size)],
                [
                    "tokens per parameter",
                    f"{alloc['tokens_per_param']:.1f}",
                    _iv(civ.get("tokens_per_param"), lambda x: f"{x:.1f}"),
                ],
                [f"predicted {s['target']}", _num(alloc["loss"]), _iv(civ.get("loss"))],
            ],
        ),
    ]
    if s.get("warnings"):
        out += ["Fit warnings:", ("list", list(s["warnings"]))]
    return out + _plots(r, "fit")


def _ratio(r: dict[str, Any]) -> list[Block]:
    s = r["summary"]
    _, alloc, civ = _budget(s)
    level = f"{(s.get('bootstrap') or {}).get('level') or 0.95:.0%}"
    tpp = civ.get("tokens_per_param")
    within = f" ({level} interval {tpp[0]:.1f}–{tpp[1]:.1f})" if tpp else " (no interval)"
    return [
        f"At C = {alloc['C']:.3g} FLOPs the compute-optimal run trains "
        f"{alloc['tokens_per_param']:.1f} tokens per parameter{within}: "
        f"N_opt = {_size(alloc['N_opt'])}, D_opt = {_size(alloc['D_opt'])}. "
        f"N_opt ∝ C^{s['a']:.3f} and D_opt ∝ C^{s['b']:.3f}. For reference, Chinchilla "
        "found ≈20 tokens per parameter and MiniCPM ≈192 on their data."
    ]


def _plan(r: dict[str, Any]) -> list[Block]:
    sh = r.get("shape") or {}
    rows = [
        ["model", str(r.get("name", ""))],
        [
            "shape",
            f"{sh.get('n_layers')} layers, d_model {sh.get('d_model')}, {sh.get('n_heads')} "
            f"heads ({sh.get('n_kv_heads')} kv), d_ff {sh.get('d_ff')}",
        ],
        ["N (non-embedding parameters)", f"{_size(r['N'])} ({r['N']:,})"],
        ["D (tokens)", f"{_size(r['D'])} ({r['D']:,})"],
        ["tokens per parameter", f"{r['tokens_per_param']:.1f}"],
        [
            f"predicted {r['target']}",
            f"{_loss(r['loss'])}, interval {_iv(r.get('loss_interval'), _loss)}",
        ],
        ["batch", f"{r['batch_size']} × {r['seq_len']} = {_size(r['batch_tokens'])} tokens"],
        ["compute", f"{r['C_6ND']:.3g} FLOPs (6ND)"],
        ["cost", f"{r['gpu_hours']:,.0f} {r['gpu'].upper()}-hours at {r['mfu']:.0%} MFU"],
    ]
    out: list[Block] = [("table", ["", "planned full run"], rows)]
    if r.get("notes"):
        out += ["Planner notes:", ("list", list(r["notes"]))]
    return [*out, f"Experiment config ({r.get('config', '')}):", ("code", r["yaml"], "yaml")]


def backtest_verdict(r: dict[str, Any]) -> str:
    """A plain sentence: was the target error met at ≥10× the fitted compute, and if not, why."""
    err, te = r["max_abs_rel_error"], r.get("target_error", 0.01)
    ext = r.get("min_extrapolation")
    if ext is None:
        ext = min((p["extrapolation"] for p in r.get("points") or []), default=0.0)
    goal = f"≤{te:.2%} at ≥{TARGET_EXTRAPOLATION:g}×"
    ok_err, ok_ext = err <= te, ext >= TARGET_EXTRAPOLATION
    if ok_err and ok_ext:
        return f"Target met: {goal} the fitted compute (max |error| {_pct(err)} at ≥{ext:.1f}×)."
    missed = []
    if not ok_err:
        missed.append(f"the error {_pct(err)} is above {_pct(te)}")
    if not ok_ext:
        missed.append(
            f"the held-out size is only {ext:.1f}× the largest fitted compute, short of "
            f"{TARGET_EXTRAPOLATION:g}× (widen the ladder's range of sizes)"
        )
    return f"Target not met ({goal}): " + " and ".join(missed) + "."


def _backtest(r: dict[str, Any]) -> list[Block]:
    pts = r.get("points") or []
    span = extrapolation_span([p["extrapolation"] for p in pts])
    return [
        f"The largest size held out and predicted from the others: max |error| "
        f"{_pct(r['max_abs_rel_error'])} (mean {_pct(r.get('mean_abs_rel_error', math.nan))}) "
        f"against a target of {_pct(r.get('target_error', 0.01))}, at {span} the largest "
        "fitted compute.",
        _table(
            "N|D|observed|predicted|rel. error|extrapolation",
            pts,
            "N D observed predicted rel_error extrapolation",
        ),
        backtest_verdict(r),
        *_plots(r, "back-test"),
    ]


def _ladder(r: dict[str, Any]) -> list[Block]:
    pts = sorted(r.get("points") or [], key=lambda p: (p["N"], p["D"]))
    return [
        f"{len(pts)} decayed points (one per WSD decay branch) — the data behind the fit.",
        _table(
            "model|N|D|D/N|C (FLOPs)|loss|bpb",
            [{**p, "ratio": p["D"] / p["N"]} for p in pts],
            "model N D ratio C loss bpb",
        ),
        *_plots(r, "ladder"),
    ]


SECTIONS = (
    ("mup_search", "μP optimum", _mup),
    ("lr_transfer", "μTransfer evidence", _lr_transfer),
    ("batch_size", "Batch-size law", _batch_size),
    ("fit", "Data–model law", _fit),
    ("fit", "Compute-optimal ratio", _ratio),
    ("plan", "Planned full run", _plan),
    ("backtest", "Back-test", _backtest),
    ("ladder", "Ladder points", _ladder),
)


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


def build(state: dict[str, Any]) -> tuple[list[list[str]], list[tuple[str, list[Block]]]]:
    """The summary rows and the sections (title, blocks) of the page."""
    from windtunnel.tunnel.runner import headline

    rows, missing = [], []
    for stage in STAGES:
        s = state.get("stages", {}).get(stage) or {}
        st_ = s.get("status") or "pending"
        if st_ == "done":
            try:
                note = headline(stage, s["result"])
            except (KeyError, TypeError, ValueError, StopIteration) as e:
                note = f"(no headline: {type(e).__name__} {e})"
        else:
            note = _reason(state, stage, s)
            missing.append(f"{stage} — {st_}: {note}")
        rows.append([stage, st_, _duration(s.get("seconds")), note])
    sections = []
    for stage, title, fn in SECTIONS:
        s = state.get("stages", {}).get(stage) or {}
        if s.get("status") == "done":
            try:
                sections.append((title, fn(s["result"])))
            except (KeyError, TypeError, ValueError, IndexError, StopIteration) as e:
                sections.append((title, [f"Could not show this result: {type(e).__name__} {e}"]))
    if missing:
        sections.append(("Stages without a result", [("list", missing)]))
    return rows, sections


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
    summary: Block = ("table", ["stage", "status", "time", "result"], rows)
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
