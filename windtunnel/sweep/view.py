"""A live view of a sweep: trials done / running / pruned / failed and the best so far."""

from __future__ import annotations

import os
import sys
from typing import Any


def counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
    }


def best_text(study: Any) -> str:
    try:
        best = study.best_trial
    except ValueError:
        return "best: -"
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
    )
    return f"best {best.value:.4f} (#{best.number}: {params})"


class SweepView:
    """A progress bar on a terminal, one line per finished trial otherwise."""

    def __init__(self, total: int, name: str) -> None:
        self.total, self.name = total, name
        self.enabled = not os.environ.get("WINDTUNNEL_NO_PROGRESS")
        self.bar = None
        self.seen: dict[str, int] = {}
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"sweep {name}", unit="trial", dynamic_ncols=True)

    def update(self, study: Any, active: dict) -> None:
        c = counts(study)
        done = c["complete"] + c["pruned"] + c["failed"]
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(
                f"running {len(active)} | pruned {c['pruned']} | failed {c['failed']} | {best_text(study)}"
            )
            self.bar.refresh()
        elif (
            self.enabled
            and c != self.seen
            and done != sum(self.seen.get(k, 0) for k in ("complete", "pruned", "failed"))
        ):
            print(
                f"[sweep {self.name}] {done}/{self.total} done (complete {c['complete']}, pruned "
                f"{c['pruned']}, failed {c['failed']}), running {len(active)}; {best_text(study)}",
                file=sys.stderr,
                flush=True,
            )
        self.seen = c

    def close(self, study: Any) -> None:
        self.update(study, {})
        if self.bar is not None:
            self.bar.close()
