"""μP search: the proxy's hyperparameters (lr, scale_emb, init_std, scale_depth); every later
sweep trains with its optimum."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from windtunnel.compose import as_override
from windtunnel.sweep.parent import SweepSummary
from windtunnel.sweep.spec import SweepSpec
from windtunnel.tunnel.render import Block, images, loss, num
from windtunnel.tunnel.stage import Context
from windtunnel.tunnel.stages.sweeps import S, Sweep, SweepResult, compact


@dataclass(kw_only=True)
class MupResult(SweepResult):
    best_value: float
    best_params: dict[str, Any]
    """Run-config key → optimum (``optim.lr``, ``model.scale_emb``, ...)."""
    best_overrides: list[str] = field(default_factory=list)
    """The optimum as run overrides: what every later sweep runs with."""
    objective: str = ""


def mup_result(summary: SweepSummary, spec: SweepSpec) -> dict[str, Any]:
    """The μP optimum as overrides for later stages (lr, scale_emb, init_std, scale_depth)."""
    if summary.best_value is None:
        raise RuntimeError(
            "the μP search finished no trial: look at its failures in the sweep summary "
            f"({spec.folder}) and rerun the tunnel (finished trials are kept)"
        )
    best = {spec.sweep.space[k].key or k: v for k, v in summary.best_params.items()}
    return {
        "best_value": summary.best_value,
        "best_params": best,
        "best_overrides": [as_override(k, v) for k, v in best.items()],
    }


class MupSearch(Sweep[MupResult]):
    name = "mup_search"
    result_type = MupResult
    titles = ("μP optimum",)

    def run(self, ctx: Context) -> MupResult:
        from windtunnel.tunnel import plots

        spec = self.spec(ctx)
        summary, trials = self.sweep(ctx, spec)
        objective, direction = spec.sweep.objective, spec.sweep.direction
        return MupResult(
            summary=summary,
            trials=compact(trials),
            **mup_result(summary, spec),
            objective=objective,
            plots=[str(plots.search_history(trials, ctx.plots(), objective, direction=direction))],
        )

    def headline(self, r: MupResult) -> str:
        params = ", ".join(f"{k}={v:.4g}" for k, v in r.best_params.items())
        return f"best {r.best_value:.4f} with {params}"

    def section(self, r: MupResult, title: str) -> list[Block]:
        s = r.summary
        n = s.n_trials if s else len(r.trials)
        complete, pruned, failed = (s.n_complete, s.n_pruned, s.n_failed) if s else (0, 0, 0)
        out: list[Block] = [
            f"Best objective {loss(r.best_value)} (trial #{s.best_trial if s else None}) of "
            f"{n} trials: {complete} complete, {pruned} pruned, {failed} failed.",
            ("table", ["parameter", "optimum"], [[k, num(v)] for k, v in r.best_params.items()]),
            "Every later sweep ran with these overrides:",
            ("code", " ".join(r.best_overrides), ""),
        ]
        fails = list(s.failures.items()) if s else []
        if fails:
            out.append("Failed trials (first 5):")
            out.append(("list", [f"#{k}: {v}" for k, v in fails[:5]]))
        return out + images(r.plots, "search history")


STAGE = MupSearch()


def best_overrides(ctx: Context) -> list[str]:
    """The μP optimum as run overrides ([] before the search has finished)."""
    mup = ctx.result(STAGE)
    return list(mup.best_overrides) if mup else []


def best_params(ctx: Context) -> dict[str, Any]:
    """The μP optimum by run-config key ({} before the search has finished)."""
    mup = ctx.result(STAGE)
    return dict(mup.best_params) if mup else {}


class AfterSearch(Sweep[S]):
    """A sweep whose runs take the μP search's optimum (every sweep after the search)."""

    def upstream(self, ctx: Context) -> list[str] | None:
        return best_overrides(ctx)
