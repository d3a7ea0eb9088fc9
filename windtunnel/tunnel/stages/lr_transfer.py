"""μTransfer check: lr sweeps at several widths, centred on the μP optimum; does the optimal lr
stay put as the model widens?"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from windtunnel.sweep.spec import SweepSpec, grid_size
from windtunnel.tunnel.render import Block, images, num, table
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
            out.check = check.to_dict()
            out.plots = [str(plots.lr_sweeps(tab, check, ctx.plots(), target=target))]
        except ScalingError as e:
            out.check = {"skipped": str(e)}
        return out

    def estimate_spec(self, tf: TunnelSpec) -> SweepSpec:
        spec = super().estimate_spec(tf)
        factors = self.settings(tf).lr_factors
        return lr_grid_overrides(spec, 1e-2, factors) if factors else spec  # the grid's size

    def headline(self, r: LrTransferResult) -> str:
        c = r.check
        if "slope" not in c:
            return f"μTransfer check skipped: {c.get('skipped')}"
        verdict = "stable" if c["stable"] else "NOT stable"
        return f"optimal lr across widths: slope {c['slope']:+.2f}, spread ×{c['spread']:.2f} ({verdict})"

    def section(self, r: LrTransferResult, title: str) -> list[Block]:
        c = r.check
        out: list[Block] = []
        if r.mup_lr:
            out.append(f"The lr grid is centred on the μP optimum lr = {num(r.mup_lr)}.")
        if "slope" not in c:
            return [*out, f"The μTransfer check was skipped: {c.get('skipped', 'no result')}."]
        verdict = "stable: μP transfers the lr" if c["stable"] else "NOT stable"
        out += [
            f"{len(r.table)} finished runs. The optimal lr moves with width as "
            f"width^{c['slope']:+.3f} (0 under perfect transfer, −1 like standard "
            f"parametrization); the optima lie within ×{c['spread']:.2f} of each other: {verdict}.",
            table(
                "width|lr_opt|target at lr_opt|lrs swept|optimum inside the grid",
                c.get("table") or [],
                "width lr_opt loss_opt n_lrs interior",
            ),
        ]
        return out + images(r.plots, "lr sweeps per width")


STAGE = LrTransfer()
