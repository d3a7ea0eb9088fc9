"""μP coordinate check: do activation and logit scales stay put as the width grows?

For each width, μP and standard parametrization (SP, ``mup=False``: no ``1/m`` anywhere) train a
few Adam steps on the same fixed token stream. After every step we record the typical size
(mean |x| per coordinate) of the embedding output, each block's output and the logits. For each
quantity we fit the slope of log(size) against log(width) at the last step: under μP the slopes
stay near 0, under SP they grow (updates of size lr to d-wide matrices move outputs ∝ d).
We also track the change since init (``Δ<name>``), which is what the updates do.

Stable means: nothing grows with width (every slope < ``tolerance``) and the hidden activations
and their changes stay flat (|slope| < ``tolerance``). μP's logits are allowed to *shrink*: the
``1/m`` output multiplier makes the output layer's init vanish like 1/sqrt(width) by design
(Tensor Programs V, Table 3), so at finite steps the logits slope is negative, never positive.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from windtunnel.config import RunConfig, resolve_model
from windtunnel.model import Decoder
from windtunnel.mup import build_optimizer

DEFAULT_TOLERANCE = 0.25


def _capture(model: Decoder, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    capture: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model(tokens, capture=capture)
    return capture


def _sizes(now: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, float]:
    """Typical size of each activation and of its change since init (key ``Δ<name>``)."""
    out = {k: v.abs().mean().item() for k, v in now.items()}
    out.update({f"Δ{k}": (v - init[k]).abs().mean().item() for k, v in now.items()})
    return out


def measure(
    cfg: RunConfig, width: int, mup: bool, *, steps: int, seed: int, batch: int = 4, seq: int = 32
) -> list[dict[str, float]]:
    """Activation sizes after each of ``steps`` Adam steps (index 0: at init)."""
    m = cfg.model
    heads = max(1, width // m.d_head)
    model_cfg = resolve_model(
        dataclasses.replace(m, d_model=width, n_heads=heads, n_kv_heads=0, d_ff=0, mup=mup),
        cfg.data.vocab_size,
    )
    torch.manual_seed(seed)
    model = Decoder(model_cfg)
    opt = build_optimizer(model, model_cfg, dataclasses.replace(cfg.optim, weight_decay=0.0))
    gen = torch.Generator().manual_seed(1234 + seed)
    # One fixed batch, trained on and probed: the updates are then correlated with the probe,
    # which is the regime μP describes (batch tokens well below the width would be needed
    # otherwise for random tokens, whose inputs are nearly orthogonal across batches).
    data = torch.randint(0, model_cfg.vocab_size, (batch, seq + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    init = _capture(model, x)
    history = [_sizes(init, init)]
    for _ in range(steps):
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(_sizes(_capture(model, x), init))
    return history


@dataclass
class CoordReport:
    widths: list[int]
    steps: int
    tolerance: float
    sizes: dict[str, dict[int, list[dict[str, float]]]]
    """param ("mup"/"sp") → width → per-step {quantity: mean |x|} (averaged over seeds)."""
    slopes: dict[str, dict[str, float]] = field(default_factory=dict)
    plot_path: str = ""

    def __post_init__(self) -> None:
        logw = np.log(self.widths)
        for param, by_width in self.sizes.items():
            last = [by_width[w][-1] for w in self.widths]
            self.slopes[param] = {
                q: float(np.polyfit(logw, np.log([s[q] for s in last]), 1)[0]) for q in last[0]
            }

    def stable(self, param: str) -> bool:
        slopes = self.slopes[param]
        grows = any(s >= self.tolerance for s in slopes.values())
        drifts = any(abs(s) >= self.tolerance for q, s in slopes.items() if "logits" not in q)
        return not (grows or drifts)

    @property
    def mup_stable(self) -> bool:
        return self.stable("mup")

    @property
    def sp_stable(self) -> bool:
        return self.stable("sp")

    def table(self) -> str:
        quantities = list(self.slopes["mup"])
        lines = [
            f"slope of log(mean|x|) vs log(width) after {self.steps} steps (stable: all < {self.tolerance}, |hidden| < {self.tolerance})"
        ]
        lines.append(f"{'quantity':<10} {'μP':>8} {'SP':>8}")
        for q in quantities:
            lines.append(f"{q:<10} {self.slopes['mup'][q]:>8.3f} {self.slopes['sp'][q]:>8.3f}")
        lines.append(
            f"μP {'STABLE' if self.mup_stable else 'UNSTABLE'}; SP {'stable' if self.sp_stable else 'unstable'}"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "widths": self.widths,
            "steps": self.steps,
            "tolerance": self.tolerance,
            "slopes": self.slopes,
            "mup_stable": self.mup_stable,
            "sp_stable": self.sp_stable,
            "plot": self.plot_path,
        }

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        blocks = sorted(q for q in self.slopes["mup"] if q.startswith("block"))
        quantities = ["embed", blocks[0], blocks[-1], "logits", "Δ" + blocks[-1], "Δlogits"]
        fig, axes = plt.subplots(
            2, len(quantities), figsize=(3.2 * len(quantities), 6), squeeze=False
        )
        cmap = plt.get_cmap("viridis")
        for row, param in enumerate(("mup", "sp")):
            for col, q in enumerate(quantities):
                ax = axes[row][col]
                for t in range(self.steps + 1):
                    ys = [self.sizes[param][w][t][q] for w in self.widths]
                    ax.plot(
                        self.widths,
                        ys,
                        marker="o",
                        ms=3,
                        color=cmap(t / max(1, self.steps)),
                        label=f"t={t}",
                    )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(
                    f"{'μP' if param == 'mup' else 'SP'} {q}\nslope {self.slopes[param][q]:+.2f}",
                    fontsize=9,
                )
                ax.set_xlabel("width")
                if col == 0:
                    ax.set_ylabel("mean |x|")
        axes[0][-1].legend(fontsize=6, loc="best")
        fig.suptitle("Coordinate check: activation size vs width, one line per training step")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.plot_path = str(path)


def coordcheck(
    cfg: RunConfig,
    *,
    widths: list[int],
    steps: int = 8,
    seeds: int = 2,
    out: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CoordReport:
    """Run the check for the model family of ``cfg`` (depth, head dim, μP knobs, lr)."""
    if len(widths) < 3 or any(w % cfg.model.d_head for w in widths):
        raise ValueError(
            f"coordcheck needs at least 3 widths, each a multiple of model.d_head={cfg.model.d_head} "
            f"(got {widths})"
        )
    threads = torch.get_num_threads()
    sizes: dict[str, dict[int, list[dict[str, float]]]] = {"mup": {}, "sp": {}}
    for param in ("mup", "sp"):
        for w in widths:
            runs = [measure(cfg, w, param == "mup", steps=steps, seed=s) for s in range(seeds)]
            sizes[param][w] = [
                {q: math.fsum(r[t][q] for r in runs) / seeds for q in runs[0][t]}
                for t in range(steps + 1)
            ]
    torch.set_num_threads(threads)
    report = CoordReport(widths=sorted(widths), steps=steps, tolerance=tolerance, sizes=sizes)
    if out is not None:
        report.plot(Path(out) / "coordcheck.png")
        (Path(out) / "coordcheck.json").write_text(json.dumps(report.to_json(), indent=1))
    return report
