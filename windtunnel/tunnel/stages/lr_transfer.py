"""μTransfer check: lr sweeps at several widths, centred on the μP optimum; does the optimal lr
stay put as the model widens, and can the sweep tell? (:mod:`windtunnel.scaling.mutransfer`:
per width the optimum with its interval, the slope across widths, the verdict "stable", "not
stable" or "cannot tell" with the design checks it rests on.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from windtunnel.sweep.spec import SweepSpec, grid_size
from windtunnel.tunnel.render import Block, images, iv, num, table
from windtunnel.tunnel.spec import TunnelSpec
from windtunnel.tunnel.stage import Context
from windtunnel.tunnel.stages.mup_search import AfterSearch, best_params
from windtunnel.tunnel.stages.sweeps import SweepResult, compact, finished, records


@dataclass(kw_only=True)
class LrTransferResult(SweepResult):
    table: list[dict[str, Any]] = field(default_factory=list)
    """Per finished run: model, width, lr and the final target (``bpb`` or ``loss``)."""
    mup_lr: float | None = None
    """The μP search's lr the grid is centred on."""
    check: dict[str, Any] = field(default_factory=dict)
    """:func:`~windtunnel.scaling.batch_lr.mutransfer_check`'s ``to_dict``, or ``{"skipped": why}``."""
    verdict: dict[str, Any] = field(default_factory=dict)
    """:func:`~windtunnel.scaling.mutransfer.transfer_verdict`'s ``to_dict``, or ``{"skipped":
    why}``; empty in results from before it (then computed from ``table`` when shown)."""


def lr_grid_overrides(spec: SweepSpec, lr: float, factors: list[float]) -> SweepSpec:
    """Center the lr grid of the μTransfer sweep on the μP search's optimum."""
    for name, p in spec.sweep.space.items():
        if (p.key or name) == "optim.lr":
            p.grid = [float(f"{lr * f:.4g}") for f in factors]
            p.low, p.high = min(p.grid) / 2, max(p.grid) * 2
            spec.sweep.n_trials = grid_size(spec.sweep.space)
            return spec
    raise ValueError("tunnel.lr_transfer.lr_factors given but the sweep has no optim.lr parameter")


def lr_transfer_table(trials: list[dict[str, Any]], target: str) -> pd.DataFrame:
    """width (d_model), lr and the final target of every finished μTransfer trial."""
    rows = []
    for t in finished(trials):
        cfg, last = t["config"], t["result"]["branches"][-1]
        rows.append(
            {
                "model": cfg["model"]["name"],
                "width": cfg["model"]["d_model"],
                "lr": cfg["optim"]["lr"],
                target: last["val_bpb" if target == "bpb" else "val_loss"],
            }
        )
    return pd.DataFrame(rows, columns=["model", "width", "lr", target])


class LrTransfer(AfterSearch[LrTransferResult]):
    name = "lr_transfer"
    result_type = LrTransferResult
    titles = ("μTransfer evidence",)

    def run(self, ctx: Context) -> LrTransferResult:
        from windtunnel.scaling import plots
        from windtunnel.scaling.batch_lr import mutransfer_check
        from windtunnel.scaling.errors import ScalingError
        from windtunnel.scaling.mutransfer import transfer_verdict

        target, factors = ctx.tf.tunnel.fit.target, self.settings(ctx.tf).lr_factors
        spec = self.spec(ctx)
        lr = best_params(ctx).get("optim.lr")
        if factors and lr:
            spec = lr_grid_overrides(spec, float(lr), factors)
        summary, trials = self.sweep(ctx, spec)
        tab = lr_transfer_table(trials, target)
        out = LrTransferResult(
            summary=summary,
            trials=compact(trials),
            table=records(tab),
            mup_lr=lr,
        )
        try:
            check = mutransfer_check(tab, target=target)
            verdict = transfer_verdict(tab, target=target)
            out.check, out.verdict = check.to_dict(), verdict.to_dict()
            out.plots = [
                str(plots.lr_sweeps(tab, check, ctx.plots(), target=target, verdict=verdict))
            ]
        except ScalingError as e:
            out.check = out.verdict = {"skipped": str(e)}
        return out

    def estimate_spec(self, tf: TunnelSpec) -> SweepSpec:
        spec = super().estimate_spec(tf)
        factors = self.settings(tf).lr_factors
        return lr_grid_overrides(spec, 1e-2, factors) if factors else spec  # the grid's size

    def headline(self, r: LrTransferResult) -> str:
        v = verdict_of(r)
        if "verdict" not in v:
            return f"μTransfer check skipped: {v.get('skipped') or r.check.get('skipped')}"
        slope = _slope_text(v)
        if v["verdict"] == "stable":
            return f"μTransfer stable: {slope}"
        if v["verdict"] == "not stable":
            return f"μTransfer NOT stable: {slope}"
        missing = [
            f"{c['name']} {c['have']} (need {c['need']})" for c in v["design"] if not c["ok"]
        ]
        unresolved = [o for o in v["optima"] if o["issue"]]
        if unresolved:
            missing.append(f"{len(unresolved)} of {len(v['optima'])} optima unresolved")
        why = "; ".join(missing) or v["why"]
        return f"μTransfer: cannot tell at this resolution ({slope}; {why})"

    def section(self, r: LrTransferResult, title: str) -> list[Block]:
        v = verdict_of(r)
        out: list[Block] = []
        if r.mup_lr:
            out.append(f"The lr grid is centred on the μP optimum lr = {num(r.mup_lr)}.")
        if "verdict" not in v:
            skipped = v.get("skipped") or r.check.get("skipped", "no result")
            return [*out, f"The μTransfer check was skipped: {skipped}."]
        level = f"{v['level']:.0%}"
        words = {"stable": "stable: μP transfers the lr", "not stable": "NOT stable"}
        out += [
            f"{len(r.table)} finished runs. Verdict: {words.get(v['verdict'], v['verdict'])} — "
            f"{v['why']}.",
            "Per width, the optimum is the vertex of a parabola in log lr through the basin "
            f"around the best swept lr, with a {level} interval from a parametric bootstrap of "
            "that fit (loss noise from seed repeats, else from the parabola's residuals). The "
            "slope is d log lr_opt / d log width (0 under perfect transfer, −1 like standard "
            "parametrization).",
            table(
                "width|lr_opt|interval|target at lr_opt|lrs swept|spacing|basin points|"
                "noise from|cannot decide because",
                [_optimum_row(o) for o in v["optima"]],
                "width lr_opt interval loss_opt n_lrs spacing n_basin noise_from issue",
            ),
            "The design this verdict needs:",
            table(
                "check|this sweep|needed|met",
                v["design"],
                "name have need ok",
            ),
        ]
        return out + images(r.plots, "lr sweeps per width")


def verdict_of(r: LrTransferResult) -> dict[str, Any]:
    """The result's verdict; for results from before it, computed from its table."""
    if r.verdict or not r.table:
        return r.verdict or dict(r.check)
    from windtunnel.scaling.errors import ScalingError
    from windtunnel.scaling.mutransfer import transfer_verdict

    tab = pd.DataFrame(r.table)
    target = next((c for c in tab.columns if c not in ("model", "width", "lr")), "loss")
    try:
        return transfer_verdict(tab, target=target).to_dict()
    except ScalingError as e:
        return {"skipped": str(e)}


def _optimum_row(o: dict[str, Any]) -> dict[str, Any]:
    bounded = o["lr_lo"] is not None and o["lr_hi"] is not None
    return {
        **o,
        "interval": iv([o["lr_lo"], o["lr_hi"]]) if bounded else "unbounded",
        "spacing": f"×{o['spacing']:.3g}",
        "issue": o["issue"] or "—",
    }


def _slope_text(v: dict[str, Any]) -> str:
    ci = v.get("slope_interval")
    if v.get("slope") is None:
        return "no slope"
    iv_ = f" ({v['level']:.0%} interval {ci[0]:+.2f} to {ci[1]:+.2f})" if ci else ""
    return f"lr_opt ∝ width^{v['slope']:+.2f}{iv_}"


STAGE = LrTransfer()
