"""What a stage's report section is made of: blocks, and numbers formatted as people read them.

A section is a list of :data:`Block`; :mod:`windtunnel.tunnel.report` renders them as HTML and
markdown. Pure formatting: no imports of the tunnel's other modules, so every stage can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Block = str | tuple[Any, ...]
"""A paragraph (str), ``("table", headers, rows)``, ``("img", path, caption)``,
``("code", text, lang)`` or ``("list", items)``."""


def si(x: float) -> str:
    """``1.2e8`` → ``120M`` (parameters, tokens)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def extrapolation_span(factors: list[float]) -> str:
    """``[2.1, 12.5]`` → ``2.1–12.5×`` (held-out compute over the largest fitted compute)."""
    if not factors:
        return "n/a"
    lo, hi = min(factors), max(factors)
    return f"{lo:.1f}×" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}×"


def num(x: Any, digits: int = 4) -> str:
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


def iv(interval: Any, fmt: Callable[[Any], str] = num) -> str:
    """An interval ``[lo, hi]`` (``—`` when there is none)."""
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]" if interval and len(interval) == 2 else "—"


def pct(x: float) -> str:
    return f"{x:.2%}"


def spct(x: float) -> str:
    return f"{x:+.2%}"


def size(x: Any) -> str:
    """Parameters or tokens: ``1.2e8`` → ``120M``."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return si(x) if ok else num(x)


def loss(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else num(x)


def duration(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


FORMATS: dict[str, Callable[[Any], str]] = {
    **dict.fromkeys(("N", "D", "bs_opt", "tokens_opt", "group"), size),
    **dict.fromkeys(("observed", "predicted", "loss", "bpb", "loss_opt"), loss),
    "rel_error": spct,
    "extrapolation": lambda x: f"{x:.1f}×",
    "ratio": lambda x: f"{x:.1f}",
    "C": lambda x: f"{x:.3g}",
    "model": str,
}
"""How a table column is formatted, by key (default :func:`num`)."""


def table(headers: str, recs: list[dict[str, Any]], keys: str) -> Block:
    """A table block: ``headers`` split on ``|``, one row per record of its ``keys``' values."""
    fmt = lambda k, v: num(v) if v is None else FORMATS.get(k, num)(v)  # noqa: E731
    rows = [[fmt(k, rec.get(k)) for k in keys.split()] for rec in recs]
    return ("table", headers.split("|"), rows)


def images(paths: list[str], caption: str) -> list[Block]:
    """One image block per PNG, captioned ``<caption>: <file name>``."""
    return [("img", Path(p), f"{caption}: {Path(p).name}") for p in paths or []]
