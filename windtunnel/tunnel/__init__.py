"""Whole wind tunnels: the stages of DESIGN §1 chained end to end (``windtunnel tunnel``).

μP search → μTransfer check → batch-size law → WSD ladder → fit → plan → back-test, each stage
feeding the next, resumable, with a report (HTML + markdown) logged to MLflow.
"""

from __future__ import annotations

from windtunnel.tunnel.dryrun import DryRun, dry_run
from windtunnel.tunnel.runner import TunnelError, run_tunnel, status
from windtunnel.tunnel.spec import TunnelConfig, TunnelSpec, load_tunnel
from windtunnel.tunnel.stages import NAMES as STAGES  # names; stages.STAGES: the Stage objects
from windtunnel.tunnel.view import list_tunnels, print_status

__all__ = [
    "STAGES",
    "DryRun",
    "TunnelConfig",
    "TunnelError",
    "TunnelSpec",
    "dry_run",
    "list_tunnels",
    "load_tunnel",
    "print_status",
    "run_tunnel",
    "status",
]
