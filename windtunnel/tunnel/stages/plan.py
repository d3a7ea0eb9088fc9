"""The planned full run: the compute-optimal model at the budget, shaped, costed and written as
an experiment config (``plan/full_run.yaml``) with the μP hyperparameters found."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from windtunnel.scaling.plan import Plan
from windtunnel.tunnel.render import Block, iv, loss, size
from windtunnel.tunnel.spec import PlanStage
from windtunnel.tunnel.stage import Context, PureStage, TunnelError
from windtunnel.tunnel.stages import fit, ladder, mup_search


@dataclass
class PlanResult(Plan):
    """The planner's :class:`~windtunnel.scaling.plan.Plan` and the config written from it."""

    config: str = ""
    """``plan/full_run.yaml``."""
    yaml: str = ""
    """Its text."""


class PlanFullRun(PureStage[PlanResult]):
    name = "plan"
    settings_type = PlanStage
    result_type = PlanResult
    titles = ("Planned full run",)

    def run(self, ctx: Context) -> PlanResult:
        from windtunnel.scaling.plan import load_fit_file, make_plan

        found = ctx.result(fit.STAGE)
        if found is None:
            raise TunnelError("the plan needs the fit: run the fit stage first")
        p = self.settings(ctx.tf)
        mup = {
            k.removeprefix("model."): v
            for k, v in mup_search.best_params(ctx).items()
            if k.startswith("model.")
        }
        proxies = ladder.proxy_family(ctx)
        if proxies.get("dim_model_base"):  # the lr found transfers from the proxies' base width
            mup["dim_model_base"] = proxies["dim_model_base"]
        plan = make_plan(  # a refused plan is reported (headline, section), not raised
            load_fit_file(found.fit_file),
            refuse=False,
            **(  # a fixed size and/or token count, else compute-optimal at the budget
                {"params": p.params or None, "tokens": p.tokens or None}
                if p.params or p.tokens
                else {"budget_flops": p.budget_flops}
            ),
            gpu=p.gpu,
            mfu=p.mfu,
            seq_len=p.seq_len,
            vocab_size=p.vocab_size,
            batch_tokens=p.batch_tokens or None,
            mup=mup,
            **({"d_head": proxies["d_head"]} if proxies.get("d_head") else {}),
            schedule=proxies.get("schedule") or None,
            name=f"{ctx.tf.tunnel.name}_full",
        )
        out = ctx.folder / "plan"
        out.mkdir(exist_ok=True)
        text = plan.to_yaml()
        (out / "full_run.yaml").write_text(text)
        return PlanResult(
            **{f.name: getattr(plan, f.name) for f in fields(Plan)},
            config=str(out / "full_run.yaml"),
            yaml=text,
        )

    def headline(self, r: PlanResult) -> str:
        refused = [w.code for w in r.warnings if w.action == "refuse"]
        if refused:
            return (
                f"plan REFUSED ({', '.join(refused)}): {size(r.N)} params × {size(r.D)} tokens "
                f"in {r.steps} optimizer steps; see the plan's section for what to change"
            )
        line = (
            f"{size(r.N)} params × {size(r.D)} tokens, predicted {r.target} "
            f"{r.loss:.3f}, {hours(r.gpu_hours)} {r.gpu.upper()}-hours"
        )
        codes = [w.code for w in r.warnings] + [
            "extrapolation"
            for n in r.notes
            if n.startswith("WARNING")  # states from before warnings
        ]
        if codes:
            s = "S" if len(codes) > 1 else ""
            named = [c if codes.count(c) == 1 else f"{c} ×{codes.count(c)}" for c in codes]
            line += f" — {len(codes)} WARNING{s} ({', '.join(dict.fromkeys(named))})"
        return line

    def metrics(self, r: PlanResult) -> dict[str, float]:
        return {
            "plan.N": r.N,
            "plan.D": r.D,
            "plan.loss": r.loss,
            "plan.gpu_hours": r.gpu_hours,
            "plan.warnings": len(r.warnings),
        }

    def artifacts(self, r: PlanResult) -> list[Path]:
        return [Path(r.config)]

    def section(self, r: PlanResult, title: str) -> list[Block]:
        sh = r.shape
        rows = [
            ["model", str(r.name)],
            [
                "shape",
                f"{sh.n_layers} layers, d_model {sh.d_model}, {sh.n_heads} heads "
                f"({sh.n_kv_heads} kv), d_ff {sh.d_ff}",
            ],
            ["N (non-embedding parameters)", f"{size(r.N)} ({r.N:,})"],
            ["D (tokens)", f"{size(r.D)} ({r.D:,})"],
            ["tokens per parameter", f"{r.tokens_per_param:.1f}"],
            [f"predicted {r.target}", f"{loss(r.loss)}, interval {iv(r.loss_interval, loss)}"],
            ["batch", f"{r.batch_size} × {r.seq_len} = {size(r.batch_tokens)} tokens"],
            ["compute", f"{r.C_6ND:.3g} FLOPs (6ND)"],
            ["cost", f"{hours(r.gpu_hours)} {r.gpu.upper()}-hours at {r.mfu:.0%} MFU"],
        ]
        out: list[Block] = [("table", ["", "planned full run"], rows)]
        if r.warnings:
            out += [
                "Warnings: where the plan goes beyond what the fit supports, and what to do "
                "(`windtunnel plan` prints the same lines):",
                ("list", [w.tagged() for w in r.warnings]),
            ]
        if r.notes:
            out += ["Planner notes:", ("list", list(r.notes))]
        return [*out, f"Experiment config ({r.config}):", ("code", r.yaml, "yaml")]


def hours(h: float) -> str:
    """GPU-hours as people read them: ``7,150``, ``0.8``, ``< 0.01``."""
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}" if h >= 0.01 else "< 0.01"


STAGE = PlanFullRun()
