"""The data–model law fitted to the ladder's points (with bootstrap intervals) and the
compute-optimal allocation at the planned budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from windtunnel.scaling.plancheck import EXTRAPOLATION_WARN
from windtunnel.tunnel.render import Block, images, iv, num, size
from windtunnel.tunnel.spec import FitStage
from windtunnel.tunnel.stage import Context, PureStage
from windtunnel.tunnel.stages import batch_size, ladder, mup_search

LAW, RATIO = "Data–model law", "Compute-optimal ratio"
PARAMS = ("E", "A", "B", "alpha", "beta", "a", "b")


@dataclass(kw_only=True)
class FitResult:
    fit_file: str
    """``fit/fit.json``: what ``windtunnel plan`` reads."""
    summary: dict[str, Any]
    """:func:`~windtunnel.scaling.analyze.json_summary` of the fit file."""
    plots: list[str] = field(default_factory=list)


def budget(s: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The fit's first budget: its key, allocation and bootstrap intervals."""
    key, alloc = next(iter(s["allocation"].items()))
    return key, alloc, (s.get("intervals") or {}).get(f"C={key}") or {}


class Fit(PureStage[FitResult]):
    name = "fit"
    settings_type = FitStage
    result_type = FitResult
    titles = (LAW, RATIO)

    def run(self, ctx: Context) -> FitResult:
        from windtunnel.scaling.analyze import analyze, json_summary, write_outputs

        f, p = ctx.tf.tunnel.fit, ctx.tf.tunnel.plan
        df = ladder.points(ctx)
        fit_file, fit, boot, extras = analyze(
            df,
            target=f.target,
            form=f.form,
            budgets=(p.budget_flops, *f.extra_budgets),
            n_boot=f.bootstrap,
            seed=f.seed,
        )
        law = batch_size.batch_size_law(ctx.result(batch_size.STAGE))
        if law:
            fit_file["batch_size_law"] = law
        fit_file["lr"] = mup_search.best_params(ctx).get("optim.lr", fit_file.get("lr"))
        paths = write_outputs(fit_file, df, fit, boot, extras, ctx.folder / "fit", target=f.target)
        return FitResult(
            fit_file=str(paths[0]),
            summary=json_summary(fit_file),
            # the back-test has its own stage and section (and plot)
            plots=[str(x) for x in paths if x.suffix == ".png" and x.name != "backtest.png"],
        )

    def headline(self, r: FitResult) -> str:
        s = r.summary
        alloc = next(iter(s["allocation"].values()))
        factor = extrapolation(s)
        beyond = f", {factor:.2g}× the fitted compute" if factor > EXTRAPOLATION_WARN else ""
        return (
            f"{s['target']} = {s['E']:.3f} + {s['A']:.3g}/N^{s['alpha']:.3f} + "
            f"{s['B']:.3g}/D^{s['beta']:.3f}; D/N at the budget "
            f"{alloc['tokens_per_param']:.3g}{beyond}"
        )

    def metrics(self, r: FitResult) -> dict[str, float]:
        s = r.summary
        alloc = next(iter(s["allocation"].values()))
        return {**{f"fit.{k}": s[k] for k in PARAMS}, "tokens_per_param": alloc["tokens_per_param"]}

    def section(self, r: FitResult, title: str) -> list[Block]:
        return _ratio(r.summary) if title == RATIO else _law(r)


def _law(r: FitResult) -> list[Block]:
    s = r.summary
    ivs, boot = s.get("intervals") or {}, s.get("bootstrap") or {}
    level = f"{boot.get('level') or 0.95:.0%}"
    _, alloc, civ = budget(s)
    out: list[Block] = [
        f"{s['target']} = E + A/N^α + B/D^β ({s.get('form', 'chinchilla')} form) fitted to "
        f"{s.get('n_points')} points; rms log residual {num(s.get('rms_log_residual'))}; "
        f"{level} intervals from {boot.get('n_boot')} bootstrap refits "
        f"({boot.get('n_failed', 0)} failed, seed {boot.get('seed')}).",
        (
            "table",
            ["parameter", "estimate", f"{level} interval"],
            [[k, num(s[k]), param_interval(ivs.get(k))] for k in PARAMS],
        ),
        f"The compute-optimal allocation at C = {alloc['C']:.3g} FLOPs:",
        (
            "table",
            ["quantity", "value", f"{level} interval"],
            [
                ["N_opt (parameters)", size(alloc["N_opt"]), iv(civ.get("N_opt"), size)],
                ["D_opt (tokens)", size(alloc["D_opt"]), iv(civ.get("D_opt"), size)],
                [
                    "tokens per parameter",
                    f"{alloc['tokens_per_param']:.1f}",
                    iv(civ.get("tokens_per_param"), lambda x: f"{x:.1f}"),
                ],
                [f"predicted {s['target']}", num(alloc["loss"]), iv(civ.get("loss"))],
            ],
        ),
    ]
    if s.get("warnings"):
        out += ["Fit warnings:", ("list", list(s["warnings"]))]
    return out + images(r.plots, "fit")


def param_interval(interval: Any) -> str:
    """A parameter's bootstrap interval; one of zero width is a parameter every refit put at
    its bound (E at 0): not identified, and said so rather than shown as certain."""
    if interval and len(interval) == 2 and interval[1] - interval[0] <= 1e-9 * abs(interval[1]):
        return "none: at its bound in every refit (not identified)"
    return iv(interval)


def extrapolation(s: dict[str, Any]) -> float:
    """The fit's first budget over its largest fitted compute (0 when the range is unknown)."""
    top = ((s.get("data_range") or {}).get("C") or [0.0, 0.0])[1]
    _, alloc, _ = budget(s)
    return float(alloc["C"]) / top if top else 0.0


def _ratio(s: dict[str, Any]) -> list[Block]:
    _, alloc, civ = budget(s)
    level = f"{(s.get('bootstrap') or {}).get('level') or 0.95:.0%}"
    tpp = civ.get("tokens_per_param")
    within = f" ({level} interval {tpp[0]:.1f}–{tpp[1]:.1f})" if tpp else " (no interval)"
    top = ((s.get("data_range") or {}).get("C") or [0.0, 0.0])[1]
    rows = []
    for key, a in s["allocation"].items():
        ci = (s.get("intervals") or {}).get(f"C={key}") or {}
        factor = float(a["C"]) / top if top else 0.0
        rows.append(
            [
                f"{float(a['C']):.3g}",
                f"{factor:.2g}×" if top else "?",
                size(a["N_opt"]),
                size(a["D_opt"]),
                f"{a['tokens_per_param']:.1f} {iv(ci.get('tokens_per_param'), lambda x: f'{x:.1f}')}",
                f"{num(a['loss'])} {iv(ci.get('loss'))}",
                "extrapolation, not a finding" if factor > EXTRAPOLATION_WARN else "",
            ]
        )
    out: list[Block] = [
        f"At C = {alloc['C']:.3g} FLOPs the compute-optimal run trains "
        f"{alloc['tokens_per_param']:.1f} tokens per parameter{within}: "
        f"N_opt = {size(alloc['N_opt'])}, D_opt = {size(alloc['D_opt'])}. "
        f"N_opt ∝ C^{s['a']:.3f} and D_opt ∝ C^{s['b']:.3f}. For reference, Chinchilla "
        "found ≈20 tokens per parameter and MiniCPM ≈192 on their data."
    ]
    if len(rows) > 1:
        out.append(
            (
                "table",
                [
                    "budget C (FLOPs)",
                    "× fitted compute",
                    "N_opt",
                    "D_opt",
                    f"tokens/param [{level}]",
                    f"predicted {s['target']} [{level}]",
                    "",
                ],
                rows,
            )
        )
    factor = extrapolation(s)
    if factor > EXTRAPOLATION_WARN:
        out.append(
            f"WARNING: this budget is {factor:.2g}× the largest compute the law was fitted on "
            f"(more than {EXTRAPOLATION_WARN:g}×): the ratio is an extrapolation, not a finding; "
            "the plan's warnings say what to do."
        )
    return out


STAGE = Fit()
