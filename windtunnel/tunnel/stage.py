"""What a tunnel stage is: one typed protocol that the runner, report, status and dry run use.

A stage is one module of :mod:`windtunnel.tunnel.stages` holding a :class:`Stage` subclass, its
result dataclass and everything only it needs; the registry ``windtunnel.tunnel.stages.STAGES``
orders them. A stage

* runs (:meth:`Stage.run`) on a :class:`Context` (the tunnel spec and what earlier stages found)
  and returns its result dataclass, which ``state.json`` keeps as ``dataclasses.asdict`` and
  reads back with :func:`windtunnel.config.from_dict` (:meth:`Stage.load`);
* says what it found in one line (:meth:`Stage.headline`: status rows, the report's summary),
  in report sections (:attr:`Stage.titles`, :meth:`Stage.section`) and as metrics of the
  tunnel's MLflow run (:meth:`Stage.metrics`, :meth:`Stage.artifacts`);
* estimates its cost for ``--dry-run`` (:meth:`Stage.estimate`);
* names the inputs its result depends on (:meth:`Stage.key`): a finished stage whose inputs
  changed is refused rather than silently reused.

Adding a stage: a module with its ``Stage`` subclass, an entry in ``STAGES``, and its settings
dataclass as a field ``tunnel.<name>`` of :class:`~windtunnel.tunnel.spec.TunnelConfig`.
"""

from __future__ import annotations

import dataclasses
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from windtunnel.config import from_dict
from windtunnel.tunnel.render import Block
from windtunnel.tunnel.spec import TunnelSpec

R = TypeVar("R")


class TunnelError(RuntimeError):
    """A tunnel cannot go on; the message says why and what to do."""


def say(msg: str) -> None:
    print(f"[tunnel] {msg}", file=sys.stderr, flush=True)


@dataclass
class StageEstimate:
    """One line of ``windtunnel tunnel --dry-run``."""

    stage: str
    enabled: bool
    trials: int = 0
    jobs: int = 0
    parallelism: int = 0
    tokens: float = 0.0
    flops: float = 0.0
    gpu_hours: float = 0.0
    wall_hours: float = 0.0
    """Trials ``parallelism`` at a time, each on its ranks (or its share of a packed GPU)."""
    gpus_per_trial: list[int] = field(default_factory=list)
    """Distinct ranks (GPUs) per trial among the stage's trials (resource rules)."""
    models: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Context:
    """What a running stage sees: the tunnel spec and the state (earlier stages' results)."""

    tf: TunnelSpec
    state: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.tf.folder

    def result(self, stage: Stage[R]) -> R | None:
        """``stage``'s result if it finished (read back into its dataclass), else None."""
        s = self.state["stages"].get(stage.name) or {}
        return stage.load(s["result"]) if s.get("status") == "done" else None

    def plots(self) -> Path:
        p = self.folder / "plots"
        p.mkdir(parents=True, exist_ok=True)
        return p


class Stage(ABC, Generic[R]):
    """One stage of a tunnel; ``R`` is its result dataclass."""

    name: str
    """``tunnel.<name>`` in the spec, ``stages.<name>`` in ``state.json``, ``--stage <name>``."""
    settings_type: type[Any]
    """Its settings dataclass in the tunnel spec (:mod:`windtunnel.tunnel.spec`)."""
    result_type: type[R]
    titles: tuple[str, ...] = ()
    """Its report sections' titles, in order; :meth:`section` renders each."""
    appendix: bool = False
    """Its sections come after every other stage's (the ladder's raw points)."""

    def settings(self, tf: TunnelSpec) -> Any:
        s = getattr(tf.tunnel, self.name)
        assert isinstance(s, self.settings_type), (self.name, type(s))
        return s

    def key(self, ctx: Context) -> dict[str, Any]:
        """What its result depends on (hashed into ``state.json``): its settings by default."""
        return {"settings": dataclasses.asdict(self.settings(ctx.tf))}

    @abstractmethod
    def run(self, ctx: Context) -> R:
        """Do the work; raise :class:`TunnelError` when an input is missing."""

    @abstractmethod
    def headline(self, result: R) -> str:
        """One line: status output and the report's summary table."""

    @abstractmethod
    def section(self, result: R, title: str) -> list[Block]:
        """The report section ``title`` (one of :attr:`titles`)."""

    def metrics(self, result: R) -> dict[str, float]:
        """Metrics logged on the tunnel's MLflow run."""
        return {}

    def artifacts(self, result: R) -> list[Path]:
        """Files logged on the tunnel's MLflow run besides the report."""
        return []

    def estimate(self, tf: TunnelSpec, peak_flops: float, mfu: float) -> StageEstimate:
        """Its ``--dry-run`` line (``peak_flops`` of one GPU, proxies at ``mfu`` of it)."""
        return StageEstimate(stage=self.name, enabled=True, note="CPU, seconds")

    def progress(self, folder: Path) -> dict[str, Any]:
        """Live detail for the status of an unfinished stage (a sweep's trial counts)."""
        return {}

    def load(self, data: Mapping[str, Any]) -> R:
        """Its result as saved in ``state.json`` → the dataclass (``ValueError`` if it is not)."""
        return from_dict(self.result_type, data, f"{self.name}.result.", finite=False)

    def dump(self, result: R) -> dict[str, Any]:
        return dataclasses.asdict(result)  # type: ignore[call-overload]


class PureStage(Stage[R]):
    """A step that only reads what the sweeps left (seconds of CPU): it depends on the fit's
    settings (target, form) as well as its own."""

    def key(self, ctx: Context) -> dict[str, Any]:
        return {**super().key(ctx), "fit": dataclasses.asdict(ctx.tf.tunnel.fit)}
