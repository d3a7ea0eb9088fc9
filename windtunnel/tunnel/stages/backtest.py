"""Back-test: fit the law to the ladder's small sizes, predict the larger ones, with intervals.

The default is the **rollout** (:mod:`windtunnel.scaling.backtest`): for every k ≥ 3 the law is
fitted to the k smallest sizes and predicts every point of every larger size, each with a
prediction interval; the report shows every held-out point, the coverage of the intervals, the
errors by extrapolation next to the ladder's noise floor, and the verdict against the target.
A ladder of 3 sizes has no rollout fold: the stage falls back to holding out the largest size
and says so. Results of an older windtunnel (the largest size alone, no intervals) still load
and render.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from windtunnel.tunnel.render import Block, extrapolation_span, images, iv, loss, pct, si, table
from windtunnel.tunnel.spec import BacktestStage
from windtunnel.tunnel.stage import Context, PureStage
from windtunnel.tunnel.stages import ladder

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

    from windtunnel.scaling.backtest import BacktestResult as Backtested

TARGET_EXTRAPOLATION = 10.0
"""The back-test's goal is the target error at ≥ this many times the largest fitted compute."""
FEW_POINTS = 30
"""Below this many held-out points the coverage is read with its binomial range."""
EXPLAIN = {
    "rollout": "Rollout back-test: for every k ≥ 3 the law is fitted to the k smallest model "
    "sizes and predicts every point of every larger size — the way a ladder is used (fit the "
    "small rungs, predict the big run), rung by rung.",
    "largest": "The largest model size held out and predicted by the law fitted to the others.",
    "each": "Each model size left out in turn and predicted by the law fitted to the others "
    "(sizes at the ends are extrapolations, the others interpolations).",
}


@dataclass(kw_only=True)
class BacktestResult:
    max_abs_rel_error: float
    """Over every held-out point."""
    mean_abs_rel_error: float = math.nan
    mode: str = "largest"
    points: list[dict[str, Any]] = field(default_factory=list)
    """Per held-out point: k (sizes fitted), model, N, D, C, observed, predicted, lo, hi, inside,
    rel_error, extrapolation, flags, param_sd, noise_sd (older results: N, D, observed,
    predicted, rel_error, extrapolation)."""
    target_error: float = 0.01
    min_extrapolation: float | None = None
    """The held-out compute over the largest fitted compute, at least."""
    plots: list[str] = field(default_factory=list)
    level: float | None = None
    """Mass of the prediction intervals; None: a result from before the intervals."""
    coverage: float | None = None
    """Share of held-out points inside their interval."""
    max_extrapolation: float | None = None
    n_boot: int = 0
    """Bootstrap refits per fold."""
    n_sizes: int = 0
    largest: dict[str, Any] = field(default_factory=dict)
    """The largest size predicted from the sizes below it: k, n, max/mean |error|, min
    extrapolation (what the back-test reported before the rollout)."""
    buckets: list[dict[str, Any]] = field(default_factory=list)
    """By extrapolation: range, n, mean/max |error|, coverage, mean relative half-width."""
    folds: list[dict[str, Any]] = field(default_factory=list)
    """:meth:`windtunnel.scaling.backtest.Fold.to_dict` per fold (``skipped``: why it failed)."""
    noise: dict[str, Any] = field(default_factory=dict)
    """The noise floor: ``source`` (seed, residuals or floor), ``sd`` (log space ≈ relative),
    ``dof`` (seed) or ``k``/``n_fit`` (the fold whose residuals)."""
    fallback: str = ""
    """Why the mode run differs from the one asked for (too few sizes for a rollout)."""
    skipped: str = ""
    """Why there is no back-test at all."""
    conventions: list[dict[str, Any]] = field(default_factory=list)
    """The same back-test with N counted by each parameter convention (non-embedding, plus the
    head, total): convention, n, coverage, mean and max |error| (or ``skipped``: why)."""


def _clean(x: Any) -> Any:
    """JSON-friendly and comparable after a round trip: NaN/inf → None, numpy → Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _noise_floor(df: pd.DataFrame, target: str, bt: Backtested) -> dict[str, Any]:
    """Seed noise where the ladder repeats points, else the residual noise of the last fold."""
    from windtunnel.scaling.intervals import seed_noise

    sd, dof = seed_noise(df, target=target)
    if dof > 0:
        return {"source": "seed", "sd": sd, "dof": dof}
    ok = [f for f in bt.folds if f.skipped is None]
    if not ok:
        return {}
    f = ok[-1]
    return {"source": f.noise_source, "sd": f.noise_sd, "k": f.fit_sizes, "n_fit": f.n_fit}


def _largest(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest held-out size, predicted from the most sizes that predicted it."""
    top = max(p["held_N"] for p in points)
    k = max(p["k"] for p in points if p["held_N"] == top)
    sel = [p for p in points if p["held_N"] == top and p["k"] == k]
    err = [abs(p["rel_error"]) for p in sel]
    return {
        "k": k,
        "n": len(sel),
        "max_abs_rel_error": max(err),
        "mean_abs_rel_error": sum(err) / len(err),
        "min_extrapolation": min(p["extrapolation"] for p in sel),
    }


def from_backtest(
    bt: Backtested,
    df: pd.DataFrame,
    *,
    target: str,
    target_error: float,
    plots: list[str] | None = None,
    fallback: str = "",
) -> BacktestResult:
    """The stage's result from a back-test of the ladder's points ``df``."""
    models = dict(zip(df["N"].astype(float), df["model"])) if "model" in df.columns else {}
    points = [_clean({**r, "model": models.get(float(r["N"]), "")}) for r in bt.to_dict()["points"]]
    ext = [p["extrapolation"] for p in points]
    return BacktestResult(
        max_abs_rel_error=bt.max_abs_error,
        mean_abs_rel_error=bt.mean_abs_error,
        mode=bt.mode,
        points=points,
        target_error=target_error,
        min_extrapolation=min(ext),
        max_extrapolation=max(ext),
        plots=list(plots or []),
        level=bt.level,
        coverage=bt.coverage,
        n_boot=bt.n_boot,
        n_sizes=bt.n_sizes,
        largest=_largest(points),
        buckets=[_clean(b) for b in bt.summary()["buckets"] if b.get("n")],
        folds=[_clean(f.to_dict()) for f in bt.folds],
        noise=_clean(_noise_floor(df, target, bt)),
        fallback=fallback,
    )


def _verdict_numbers(r: BacktestResult) -> tuple[float, float, list[dict[str, Any]]]:
    """(max |error|, extrapolation, the points at ≥10×) the verdict is about."""
    if r.level is None or not r.points:  # the largest size alone, from before the rollout
        ext = r.min_extrapolation
        if ext is None:
            ext = min((p["extrapolation"] for p in r.points), default=0.0)
        return r.max_abs_rel_error, ext, []
    far = [p for p in r.points if p["extrapolation"] >= TARGET_EXTRAPOLATION]
    if far:
        return max(abs(p["rel_error"]) for p in far), min(p["extrapolation"] for p in far), far
    return r.max_abs_rel_error, max(p["extrapolation"] for p in r.points), []


def backtest_verdict(r: BacktestResult) -> str:
    """A plain sentence: was the target error met at ≥10× the fitted compute, and if not, why.

    With intervals (the rollout), the points at ≥10× are judged; where none reaches 10×, the
    farthest one says how short the ladder is."""
    err, ext, far = _verdict_numbers(r)
    te = r.target_error
    goal = f"≤{te:.2%} at ≥{TARGET_EXTRAPOLATION:g}×"
    ok_err, ok_ext = err <= te, ext >= TARGET_EXTRAPOLATION
    if ok_err and ok_ext:
        over = f" over the {len(far)} points" if far else ""
        return (
            f"Target met: {goal} the fitted compute (max |error| {pct(err)}{over} at ≥{ext:.1f}×)."
        )
    missed = []
    if not ok_err and far:
        missed.append(
            f"the max |error| at ≥{TARGET_EXTRAPOLATION:g}× is {pct(err)}, above {pct(te)}"
        )
    elif not ok_err:
        missed.append(f"the error {pct(err)} is above {pct(te)}")
    if not ok_ext:
        if r.level is None:
            missed.append(
                f"the held-out size is only {ext:.1f}× the largest fitted compute, short of "
                f"{TARGET_EXTRAPOLATION:g}× (widen the ladder's range of sizes)"
            )
        else:
            missed.append(
                f"no held-out point reaches {TARGET_EXTRAPOLATION:g}× the fitted compute (the "
                f"farthest is {ext:.1f}×; widen the ladder's range of sizes)"
            )
    return f"Target not met ({goal}): " + " and ".join(missed) + "."


def binomial_range(n: int, p: float, mass: float = 0.95) -> tuple[int, int]:
    """Central range holding ``mass`` of Binomial(n, p): how many of n honest intervals of level
    p contain their observation."""
    cdf, lo, hi, tail = 0.0, None, n, (1.0 - mass) / 2.0
    for i in range(n + 1):
        cdf += math.comb(n, i) * p**i * (1.0 - p) ** (n - i)
        if lo is None and cdf > tail:
            lo = i
        if cdf >= 1.0 - tail:
            hi = i
            break
    return (lo if lo is not None else 0), hi


def _coverage(r: BacktestResult, level: float) -> str:
    n = len(r.points)
    inside = sum(bool(p.get("inside")) for p in r.points)
    text = (
        f"Coverage: {inside} of {n} held-out points ({inside / n:.0%}) lie inside their "
        f"{level:.0%} prediction interval. Honest intervals cover about {level:.0%}; far less "
        "means the intervals are too narrow (the law is surer than it should be), far more "
        "that they are too wide."
    )
    if n < FEW_POINTS:
        lo, hi = binomial_range(n, level)
        judged = (
            "fewer than that: the intervals are too narrow"
            if inside < lo
            else "more than that: the intervals are too wide"
            if inside > hi
            else "consistent with honest intervals"
        )
        text += (
            f" With only {n} points this is a coarse check: honest intervals would put {lo}–{hi} "
            f"inside (95% binomial range; points of one fold share its fit, so the real spread "
            f"is wider) — {inside} is {judged}."
        )
    return text


def bias_sentence(r: BacktestResult, share: float = 0.8) -> str:
    """A plain sentence when the held-out errors beyond the noise band are one-sided (at least
    ``share`` of them, and at least 4): a bias of the law, which intervals built from the same
    law's bootstrap and noise cannot contain; "" otherwise."""
    band = _noise_band(r)
    errs = [float(p["rel_error"]) for p in r.points if abs(float(p["rel_error"])) > band]
    high = sum(e > 0 for e in errs)
    one_sided = max(high, len(errs) - high)
    if len(errs) < 4 or one_sided < share * len(errs):
        return ""
    mean = sum(errs) / len(errs)
    if high > len(errs) - high:
        what = (
            f"predicted too high (mean error {mean:+.2%}): the larger sizes gain more than the "
            "law fitted on the smaller ones allows. Usual causes: small rungs off the larger "
            "ones' trend (too few optimizer steps for their batch, too shallow or narrow, mostly "
            "embedding); give them smaller batches, drop the smallest, or count N another way "
            "(the conventions below)"
        )
    else:
        what = (
            f"predicted too low (mean error {mean:+.2%}): the larger sizes gain less than the "
            "law fitted on the smaller ones promises. Usual causes: the large rungs' lr or batch "
            "off their optimum, repeated data at the largest rungs, or a floor (E) the small "
            "rungs cannot see"
        )
    beyond = " beyond the noise band" if band else ""
    return (
        f"Systematic: {one_sided} of the {len(errs)} held-out points{beyond} "
        f"are {what}. A bias of the law is not noise: the intervals (bootstrap refits of the same "
        "law plus noise) cannot contain it, and more points of the same sizes will not fix it."
    )


def _noise_band(r: BacktestResult) -> float:
    """±90% of the noise floor: errors inside it cannot be told from noise (0: not measured)."""
    return 1.645 * float((r.noise or {}).get("sd", 0.0))


def _noise_sentence(r: BacktestResult) -> str:
    nz = r.noise
    sd = float(nz["sd"])
    band = _noise_band(r)
    if nz["source"] == "seed":
        what = (
            f"the seed noise of the ladder's repeated points: σ = {pct(sd)} "
            f"({nz['dof']} degrees of freedom)"
        )
    elif nz["source"] == "floor":
        what = (
            f"no repeated points in the ladder, and the residuals of the fit on the "
            f"{nz['k']} smallest sizes are below the floor: σ = {pct(sd)} (the fit's Huber δ)"
        )
    else:
        what = (
            f"no repeated points in the ladder (no seed noise measured), so the residual "
            f"noise of the fit on the {nz['k']} smallest sizes ({nz['n_fit']} points, "
            f"inflated by √(n/(n−5))): σ = {pct(sd)}"
        )
    return (
        f"Noise floor: {what}. An error within ±{pct(band)} (90% of that noise) cannot be "
        "told from noise."
    )


def _bucket_rows(r: BacktestResult) -> list[dict[str, Any]]:
    return [
        {
            "range": b["range"],
            "n": b["n"],
            "mean": pct(b["mean_abs_rel_error"]),
            "max": pct(b["max_abs_rel_error"]),
            "coverage": f"{b['coverage']:.0%}",
            "hw": f"±{pct(b['mean_half_width'])}",
        }
        for b in r.buckets
    ]


def _point_rows(r: BacktestResult) -> list[dict[str, Any]]:
    rows = []
    for p in r.points:
        lo, hi = p.get("lo"), p.get("hi")
        model = f"{p['model']} ({si(p['N'])})" if p.get("model") else si(p["N"])
        rows.append(
            {
                **p,
                "model_N": model,
                "interval": iv([lo, hi], loss) if lo is not None and hi is not None else "—",
                "in": None if "inside" not in p else "yes" if p["inside"] else "NO",
            }
        )
    return rows


class Backtest(PureStage[BacktestResult]):
    name = "backtest"
    settings_type = BacktestStage
    result_type = BacktestResult
    titles = ("Back-test",)

    def run(self, ctx: Context) -> BacktestResult:
        from windtunnel.scaling import plots
        from windtunnel.scaling.backtest import DEFAULT_BOOT, backtest
        from windtunnel.scaling.errors import ScalingError, TooFewPointsError

        t, s = ctx.tf.tunnel, self.settings(ctx.tf)
        df = ladder.points(ctx)

        def run(mode: str, frame: pd.DataFrame = df) -> Backtested:
            return backtest(
                frame,
                target=t.fit.target,
                mode=mode,
                n_boot=DEFAULT_BOOT,
                level=s.level,
                seed=t.fit.seed,
                form=t.fit.form,
            )

        fallback = ""
        try:
            try:
                bt = run(s.mode)
            except TooFewPointsError:
                if s.mode != "rollout":
                    raise
                bt = run("largest")
                fallback = (
                    f"A rollout needs ≥4 model sizes (it fits the k ≥ 3 smallest and predicts "
                    f"the larger ones); this ladder has {bt.n_sizes}, so the back-test fell "
                    "back to holding out the largest size."
                )
        except ScalingError as e:
            return BacktestResult(
                max_abs_rel_error=math.nan,
                mode=s.mode,
                target_error=s.target_error,
                level=s.level,
                skipped=str(e),
            )
        plot = plots.backtest_intervals(bt, ctx.plots(), target=t.fit.target)
        result = from_backtest(
            bt,
            df,
            target=t.fit.target,
            target_error=s.target_error,
            plots=[str(plot)],
            fallback=fallback,
        )
        result.conventions = conventions(df, bt, lambda frame: run(bt.mode, frame))
        return result

    def headline(self, r: BacktestResult) -> str:
        if r.skipped:
            return f"no back-test: {r.skipped}"
        if r.level is None:  # the largest size alone, from before the rollout
            return (
                f"held-out largest size: max |error| {r.max_abs_rel_error:.2%} at "
                f"≥{r.min_extrapolation:.1f}× the fitted compute"
            )
        n = len(r.points)
        inside = sum(bool(p["inside"]) for p in r.points)
        span = extrapolation_span([p["extrapolation"] for p in r.points])
        line = (
            f"{r.mode}: {n} held-out points, {r.level:.0%} coverage {inside}/{n}, "
            f"max |error| {r.max_abs_rel_error:.2%} at {span}"
        )
        failed = sum(1 for f in r.folds if f.get("skipped"))
        if failed:
            line += f"; {failed} fold(s) failed to fit"
        if r.fallback:
            line += f" (too few sizes for a rollout: {r.n_sizes})"
        return line

    def metrics(self, r: BacktestResult) -> dict[str, float]:
        out = {
            "backtest.max_abs_rel_error": r.max_abs_rel_error,
            "backtest.mean_abs_rel_error": r.mean_abs_rel_error,
            "backtest.coverage": r.coverage,
            "backtest.min_extrapolation": r.min_extrapolation,
            "backtest.max_extrapolation": r.max_extrapolation,
            "backtest.n_points": float(len(r.points)) if r.points else None,
        }
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}

    def section(self, r: BacktestResult, title: str) -> list[Block]:
        if r.skipped:
            return [f"No back-test: {r.skipped}."]
        out: list[Block] = [EXPLAIN.get(r.mode, f"Back-test ({r.mode}).")]
        if r.fallback:
            out.append(r.fallback)
        span = extrapolation_span([p["extrapolation"] for p in r.points])
        n_ok = sum(1 for f in r.folds if not f.get("skipped"))
        folds = f" from {n_ok} fold(s)" if r.folds else ""
        lead = (
            f"{len(r.points)} held-out points{folds}: max |error| {pct(r.max_abs_rel_error)} "
            f"(mean {pct(r.mean_abs_rel_error)}) against a target of {pct(r.target_error)}, at "
            f"{span} the largest fitted compute."
        )
        if r.level is not None:
            lead += (
                f" Each prediction has a {r.level:.0%} prediction interval: {r.n_boot} bootstrap "
                "refits of the fold's fit, plus its residual and seed noise. Extrapolation is "
                "the point's compute over the largest compute its fold was fitted on."
            )
        out.append(lead)
        big = r.largest
        if big and r.mode != "largest":
            out.append(
                f"The largest size, predicted from the {big['k']} sizes below it: max |error| "
                f"{pct(big['max_abs_rel_error'])} (mean {pct(big['mean_abs_rel_error'])}) over "
                f"{big['n']} points at ≥{big['min_extrapolation']:.1f}×."
            )
        level = f"{r.level:.0%} interval" if r.level is not None else "interval"
        out.append(
            table(
                f"k fitted|model (N)|D|observed|predicted|{level}|inside?|rel. error|"
                "extrapolation|flags",
                _point_rows(r),
                "k model_N D observed predicted interval in rel_error extrapolation flags",
            )
        )
        if r.level is not None and r.points:
            out.append(_coverage(r, r.level))
        if bias := bias_sentence(r):
            out.append(bias)
        if r.buckets:
            out.append(
                table(
                    "extrapolation|points|mean abs. error|max abs. error|coverage|"
                    "mean interval half-width",
                    _bucket_rows(r),
                    "range n mean max coverage hw",
                )
            )
        if r.noise:
            out.append(_noise_sentence(r))
        out += _fold_notes(r)
        out += _conventions_blocks(r)
        out.append(backtest_verdict(r))
        out += images(r.plots, "back-test")
        return out


CONVENTIONS = (("non-embedding", "N"), ("non-embedding + head", "N_head"), ("total", "N_total"))
"""How N is counted: MiniCPM's and Kaplan's non-embedding parameters, plus the output head, or
every parameter (Chinchilla's); at small sizes the embedding is a large share of the model and
the conventions give different laws (Pearce & Song 2024)."""


def conventions(
    df: pd.DataFrame, bt: Backtested, run_on: Callable[[pd.DataFrame], Backtested]
) -> list[dict[str, Any]]:
    """The back-test ``bt`` (N non-embedding) and the same back-test with N counted by each
    other convention the ladder recorded; conventions equal to an earlier one (the total of a
    model whose head is tied to its embedding is N + head) are merged into its name."""
    import numpy as np

    from windtunnel.scaling.errors import ScalingError

    def row(name: str, b: Backtested) -> dict[str, Any]:
        return _clean(
            {
                "convention": name,
                "n": len(b.table),
                "coverage": b.coverage,
                "mean": b.mean_abs_error,
                "max": b.max_abs_error,
            }
        )

    rows, seen = [row(CONVENTIONS[0][0], bt)], [df["N"].to_numpy(float)]
    for name, col in CONVENTIONS[1:]:
        if col not in df or not (df[col] > 0).all():
            continue
        x = df[col].to_numpy(float)
        same = next((i for i, y in enumerate(seen) if np.allclose(x, y)), None)
        if same is not None:
            rows[same]["convention"] += f" (= {name})"
            continue
        seen.append(x)
        try:
            rows.append(row(name, run_on(df.assign(N=x))))
        except ScalingError as e:
            rows.append({"convention": name, "skipped": str(e)})
            seen.pop()
    return rows if len(rows) > 1 else []


def _conventions_blocks(r: BacktestResult) -> list[Block]:
    ok = [c for c in r.conventions if not c.get("skipped") and c.get("mean") is not None]
    if not ok:
        return []
    best = min(ok, key=lambda c: c["mean"])
    rows = [
        [
            c["convention"],
            str(c.get("n", "—")),
            pct(c["coverage"]) if c.get("coverage") is not None else "—",
            pct(c["mean"]) if c.get("mean") is not None else "—",
            pct(c["max"]) if c.get("max") is not None else c.get("skipped", "—"),
        ]
        for c in r.conventions
    ]
    return [
        "The same back-test with N counted by each parameter convention (the fit and the plan "
        "use non-embedding N, MiniCPM's):",
        ("table", ["N counts", "points", "coverage", "mean abs. error", "max abs. error"], rows),
        f"Best back-test: {best['convention']} (mean |error| {pct(best['mean'])}).",
    ]


def _fold_notes(r: BacktestResult) -> list[Block]:
    """The legend of the flags that occur, and the folds that failed to fit."""
    from windtunnel.scaling.backtest import FLAG_LEGEND

    seen = dict.fromkeys(fl for p in r.points for fl in str(p.get("flags") or "").split())
    out: list[Block] = []
    if seen:
        legend = [f"{fl}: {FLAG_LEGEND.get(fl, 'see the fold warnings')}" for fl in seen]
        out += ["Flags:", ("list", legend)]
    failed = [
        f"k = {f['fit_sizes']} (held out sizes {', '.join(map(str, f['held_out']))}): "
        f"{f['skipped']}"
        for f in r.folds
        if f.get("skipped")
    ]
    if failed:
        out += ["Folds that failed to fit (their points are missing from the table):"]
        out.append(("list", failed))
    return out


STAGE = Backtest()
