"""``windtunnel status``: where tunnels stand, as a table on stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def print_status(summary: dict[str, Any]) -> None:
    """One line per stage: status, seconds, trials or headline."""
    out = [f"tunnel {summary['tunnel']} ({summary['folder']})"]
    for r in summary["stages"]:
        detail = r.get("headline") or r.get("error") or ""
        if "trials" in r:
            c = r["trials"]
            detail = (
                f"trials: {c['complete']} complete, {c['pruned']} pruned, "
                f"{c['failed']} failed, {c['running']} running"
            )
        secs = f"{r['seconds']:>7.0f}s" if "seconds" in r else " " * 8
        out.append(f"  {r['stage']:<12}{r['status']:<9}{secs}  {detail}")
    if summary.get("report"):
        out.append(f"  report: {summary['report'].get('html')}")
    print("\n".join(out), file=sys.stderr)


def list_tunnels(overrides: list[str]) -> list[dict[str, Any]]:
    """Status of every tunnel folder under ``tunnel.dir`` (read from the state files alone)."""
    root = Path(".windtunnel/tunnels")
    for o in overrides:
        if o.startswith("tunnel.dir="):
            root = Path(o.split("=", 1)[1])
    from windtunnel.tunnel.runner import load_state, summarize

    return [summarize(load_state(p), p.parent) for p in sorted(root.glob("*/state.json"))]
