"""The stages of a tunnel: sweeps that train, then pure steps that read what they left.

Every sweep stage is a sweep spec from ``sweeps/`` run under the tunnel's name, folder and
launcher, with what earlier stages found added to its runs (the μP optimum). Results are read
back from the trial run folders (``result.json``, ``config.json``, ``journal.jsonl``): the tunnel
needs no tracking server to compute anything, and a rerun reads the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from windtunnel.compose import as_override, split_overrides
from windtunnel.sweep.spec import SweepSpec, grid_size, load_sweep
from windtunnel.sweep.trial import trial_name
from windtunnel.tunnel.spec import SweepStage, TunnelSpec


def sweep_spec(tf: TunnelSpec, stage: str, upstream: list[str]) -> SweepSpec:
    """The sweep spec of ``stage``: its file, the tunnel's overrides, launcher and folder."""
    st: SweepStage = getattr(tf.tunnel, stage)
    t = tf.tunnel
    own, run = split_overrides(st.set, ("sweep", "launcher", "hydra"))
    spec = load_sweep(
        st.sweep,
        [
            *(o for o in own if not o.startswith("launcher")),
            f"sweep.name={stage}",
            f"sweep.stage={stage}",
            f"sweep.dir={tf.folder / 'sweeps'}",
        ],
    )
    spec.run = [*spec.run, *t.run, *upstream, *run, *tf.run, f"tracker.experiment={t.name}/{stage}"]
    if spec.sweep.sampler.kind == "grid" and not any(o.startswith("sweep.n_trials") for o in own):
        spec.sweep.n_trials = grid_size(spec.sweep.space)  # the whole grid unless a count is set
    spec.launcher = _stage_launcher(tf, [o for o in own if o.startswith("launcher.")])
    spec.validate()
    return spec


def _stage_launcher(tf: TunnelSpec, overrides: list[str]) -> Any:
    """The tunnel's launcher with a stage's own ``launcher.*`` settings on top (e.g. packing
    ``launcher.trials_per_job=8`` for the 9M search but not for the 0.5B ladder)."""
    from omegaconf import OmegaConf

    from windtunnel.launch.options import launcher_options

    own = OmegaConf.from_dotlist([o[len("launcher.") :] for o in overrides])
    return launcher_options(OmegaConf.merge(tf.launcher.as_dict(changed_only=True), own))


def lr_grid_overrides(spec: SweepSpec, lr: float, factors: list[float]) -> SweepSpec:
    """Center the lr grid of the μTransfer sweep on the μP search's optimum."""
    for name, p in spec.sweep.space.items():
        if (p.key or name) == "optim.lr":
            p.grid = [float(f"{lr * f:.4g}") for f in factors]
            p.low, p.high = min(p.grid) / 2, max(p.grid) * 2
            spec.sweep.n_trials = grid_size(spec.sweep.space)
            return spec
    raise ValueError("tunnel.lr_transfer.lr_factors given but the sweep has no optim.lr parameter")


# -- reading a finished sweep back ------------------------------------------------------------


def trial_records(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial of the study with its state, params, value, intermediate values, and the
    run folder's result and config where it wrote them."""
    import optuna

    from windtunnel.sweep.driver import FAIL_REASON, storage_url
    from windtunnel.sweep.trial import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec.sweep.name, storage=open_storage(storage_url(spec)))
    out = []
    for t in study.get_trials(deepcopy=False):
        run_dir = spec.folder / "runs" / trial_name(spec.sweep.name, t.number)
        rec: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params),
            "value": t.value,
            "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
            "run_dir": str(run_dir),
            "failure": t.user_attrs.get(FAIL_REASON),
        }
        for name in ("result", "config"):
            f = run_dir / f"{name}.json"
            rec[name] = json.loads(f.read_text()) if f.is_file() else None
        out.append(rec)
    return out


def mup_result(summary: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """The μP optimum as overrides for later stages (lr, scale_emb, init_std, scale_depth)."""
    if summary.get("best_value") is None:
        raise RuntimeError(
            "the μP search finished no trial: look at its failures in the sweep summary "
            f"({spec.folder}) and rerun the tunnel (finished trials are kept)"
        )
    best = {spec.sweep.space[k].key or k: v for k, v in summary["best_params"].items()}
    return {
        "best_value": summary["best_value"],
        "best_params": best,
        "best_overrides": [as_override(k, v) for k, v in best.items()],
    }


def _finished(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in trials if t["state"] == "COMPLETE" and (t["result"] or {}).get("branches")]


def lr_transfer_table(trials: list[dict[str, Any]], target: str) -> pd.DataFrame:
    """width (d_model), lr and the final target of every finished μTransfer trial."""
    rows = []
    for t in _finished(trials):
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


def batch_curves(trials: list[dict[str, Any]], target: str) -> pd.DataFrame:
    """Evaluation curves (run, batch tokens, N, tokens, loss) of every finished trial."""
    key = "val_bpb" if target == "bpb" else "val_loss"
    rows = []
    for t in _finished(trials):
        cfg = t["config"]
        batch_tokens = cfg["optim"]["batch_size"] * cfg["data"]["seq_len"]
        N = t["result"]["N"]
        for step, values in journal_metrics(Path(t["run_dir"]) / "journal.jsonl", key):
            if step > 0:
                rows.append(
                    {
                        "run_id": t["number"],
                        "batch_tokens": float(batch_tokens),
                        "N": float(N),
                        "tokens": float(step),
                        "loss": values,
                    }
                )
    return pd.DataFrame(rows, columns=["run_id", "batch_tokens", "N", "tokens", "loss"])


def journal_metrics(path: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one metric in a run's journal (last value per step)."""
    from windtunnel.tracking.journal import iter_events

    if not path.is_file():
        return []
    seen = {
        int(ev["step"]): float(ev["values"][key])
        for ev, _ in iter_events(path)
        if ev["ev"] == "metrics" and key in ev.get("values", {})
    }
    return sorted(seen.items())


def ladder_points(trials: list[dict[str, Any]]) -> pd.DataFrame:
    """The data–model points: one row per decay branch of every finished ladder trial."""
    rows = []
    for t in _finished(trials):
        model = t["config"]["model"]["name"]
        for b in t["result"]["branches"]:
            rows.append(
                {
                    "model": model,
                    "N": float(b["N"]),
                    "D": float(b["D"]),
                    "C": float(b["flops"]),
                    "loss": float(b["val_loss"]),
                    "bpb": float(b["val_bpb"]),
                    "run_id": b["run_id"],
                }
            )
    return pd.DataFrame(rows, columns=["model", "N", "D", "C", "loss", "bpb", "run_id"])


def batch_law(curves: pd.DataFrame) -> Any:
    """MiniCPM's iso-loss batch-size law on the curves (levels between the 5% and 35%
    quantiles of the observed losses, where every batch size has a chance to reach them)."""
    from windtunnel.scaling.batch_lr import batch_size_law_iso_loss

    lo, hi = np.quantile(curves["loss"], [0.05, 0.35])
    return batch_size_law_iso_loss(curves, list(np.linspace(lo, hi, 6)), group_col="N")
