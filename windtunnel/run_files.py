"""The files of a run folder: results, identity and the checks that keep a resume honest.

``result.json``, ``points/<D>.json``, ``identity.json``, ``initial_eval.json`` and
``ckpt/<segment>.logged.json`` (see :mod:`windtunnel.train` for the folder's layout) are
versioned and checked against their schema when read back; a run folder resumes only under the
config that made it (:func:`check_same_run`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from windtunnel.config import RunConfig, flatten, to_dict
from windtunnel.files import atomic_write
from windtunnel.schema import FileModel, load_versioned, model_of


@dataclass
class PointResult:
    """A finished (decayed) point of the data–model law."""

    tokens: int
    N: int
    D: int
    flops: float
    val_loss: float
    val_bpb: float
    domains: dict[str, dict[str, float]]
    run_id: str


@dataclass
class TrainResult:
    status: str
    """``finished``, ``diverged``, ``pruned`` or ``preempted``."""
    run_id: str
    tracking_uri: str
    run_dir: str
    N: int
    tokens: int
    flops: float
    initial_val_loss: float
    val_loss: float
    val_bpb: float
    failure: str | None = None
    points: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0
    dashboard: str = ""
    """MLflow page with this run's loss charts (empty without a server)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["branches"] = out.pop("points")
        return out


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The part of a config that determines the run's results (not where it is tracked)."""
    d: dict[str, Any] = json.loads(json.dumps(to_dict(cfg), default=str))
    for key in ("tracker", "resume", "run_dir", "name", "stage", "tags"):
        d.pop(key)
    # how the run is laid out on hardware does not change its curve: a run saved on 2 ranks
    # resumes on 1 or 4 in the same folder
    for key in (
        "progress",
        "device",
        "threads",
        "parallel",
        "nproc_per_node",
        "activation_checkpointing",
    ):
        d["train"].pop(key)
    return d


LAYOUT = ("optim.grad_accum",)
"""Part of the identity (and of a default run name) that a resume may still change: micro-batches
are row slices of the same global batch, so the curve does not depend on them."""


def run_name(cfg: RunConfig) -> str:
    """Stable name: the same config resumes the same run folder."""
    if cfg.name:
        return cfg.name
    digest = hashlib.sha1(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.model.name}-{digest}"


def check_same_run(saved: dict[str, Any], cfg: RunConfig, where: Path) -> None:
    """Refuse to resume a run folder with a different config (results would be mixed)."""
    a, b = flatten(saved), flatten(identity(cfg))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in LAYOUT)
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ValueError(
            f"run folder {where} holds a run with a different config ({shown}); "
            "give this run another name=..., or pass resume=false to start it over"
        )


def _json_write(path: Path, obj: Any, *, fsync: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=str), fsync=fsync)


# -- the run folder's own files: versioned, checked when read back -------------------------------

RUN_FILES_VERSION = 1
"""Version of ``result.json``, ``identity.json``, ``initial_eval.json``, ``points/<D>.json`` and
``ckpt/<segment>.logged.json``; files from before they had one are version 1."""


class _Logged(FileModel):
    version: int = 1
    train: int
    eval: int


class _InitialEval(FileModel):
    version: int = 1
    val_loss: float


class _Identity(FileModel):
    """The config sections themselves are compared with this run's (:func:`check_same_run`)."""

    version: int = 1


_Point = model_of(PointResult, "PointFile", version=(int, 1))
_Result = model_of(
    TrainResult,
    "ResultFile",
    drop=("points",),
    version=(int, 1),
    branches=(list[_Point], ...),  # type: ignore[valid-type]  # a model built at run time
)


def _versioned(obj: dict[str, Any]) -> dict[str, Any]:
    return {"version": RUN_FILES_VERSION, **obj}


def _read_run_file(path: Path, model: type[FileModel]) -> dict[str, Any]:
    """A run folder file checked against ``model`` (without its ``version``)."""
    _, data = load_versioned(
        path,
        {RUN_FILES_VERSION: model},
        what="run folder file",
        fix=f"start the run over (resume=false) or give it another name=..., or delete {path}",
    )
    return {k: v for k, v in data.items() if k != "version"}


def _result_from_json(d: dict[str, Any]) -> TrainResult:
    d = dict(d)
    d["points"] = [PointResult(**p) for p in d.pop("branches")]
    return TrainResult(**d)
