"""Checkpoints through ``torch.distributed.checkpoint`` (DCP): sharded, atomic, resharded on load.

A checkpoint is a folder::

    <name>/.metadata, __<rank>_0.distcp   DCP: model and AdamW state, each rank writes its shards
    <name>/meta.json                      step, loss-guard state, the model's shape, who saved it

Every rank calls :func:`save` and :func:`load` (they are collective). The model and optimizer
state go through ``get_state_dict``/``set_state_dict``, which name tensors by the unwrapped
module's parameter names, so a checkpoint saved by 2 FSDP ranks loads into 1 plain process, into
4 DDP ranks, or into :func:`load_model` for export. The data position is the step (batches are a
pure function of seed and step); nothing in training draws from torch's RNG after init, so no RNG
state is kept.

Atomic: the ranks write ``<name>.partial``; rank 0 adds ``meta.json`` and renames it over
``<name>`` (the previous one is kept as ``<name>.old`` for the instant between two renames, and
:func:`resolve` falls back to it). A run killed mid-save resumes from the previous checkpoint.

A checkpoint of windtunnel ≤ 0.1 (one ``<name>.pt`` file from ``torch.save``) still loads into a
single process.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from windtunnel.distributed import World
from windtunnel.files import atomic_write
from windtunnel.schema import FileModel, SchemaError, load_versioned, written


@contextmanager
def _quiet() -> Iterator[None]:
    """One process without a process group is a supported use of DCP, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


FORMAT = 2
"""Version of the checkpoint layout (1: a single ``torch.save`` file)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here (other model, unknown format, legacy on ranks)."""


class CheckpointMetaError(CheckpointError, SchemaError):
    """A checkpoint's ``meta.json`` this windtunnel cannot read: path, field, what to do."""


class CheckpointMeta(FileModel):
    """``meta.json`` of a checkpoint folder; its version is ``format`` (:data:`FORMAT`)."""

    format: int
    step: int
    guard: list[float] = Field(min_length=2, max_length=2)
    model_shape: dict[str, int] = Field(default_factory=dict)
    world_size: int = 1
    parallel: str = "none"


def resolve(path: Path) -> Path | None:
    """The checkpoint at ``path`` (a folder), its ``.old`` left by a save killed between its two
    renames, or the legacy ``path.pt`` file; None when there is none."""
    for candidate in (path, path.with_name(path.name + ".old"), path.with_name(path.name + ".pt")):
        if candidate.is_dir() and (candidate / "meta.json").exists():
            return candidate
        if candidate.suffix == ".pt" and candidate.is_file():
            return candidate
    return None


def exists(path: Path) -> bool:
    return resolve(path) is not None


def _shape(model: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "cfg", None)
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_ff", "vocab_size")
    return {k: getattr(cfg, k) for k in keys} if cfg is not None else {}


def save(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    world: World,
    *,
    parallel: str = "",
) -> None:
    """Save model, optimizer and ``meta`` (step, guard, ...) to the folder ``path``."""
    partial = path.with_name(path.name + ".partial")
    if world.main and partial.exists():
        shutil.rmtree(partial)
    world.barrier()
    msd, osd = get_state_dict(model, optimizer)
    with _quiet():
        dcp_save({"model": msd, "optim": osd}, checkpoint_id=str(partial))
    if world.main:
        info = {
            "format": FORMAT,
            **meta,
            "model_shape": _shape(model),
            "world_size": world.size,
            "parallel": parallel if world.distributed else "none",
        }
        atomic_write(partial / "meta.json", json.dumps(written(CheckpointMeta, info), indent=1))
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        partial.rename(path)
        if old.exists():
            shutil.rmtree(old)
    world.barrier()


def read_meta(path: Path) -> dict[str, Any]:
    found = resolve(path)
    if found is None:
        raise CheckpointError(f"no checkpoint at {path}")
    if found.suffix == ".pt":
        state = torch.load(found, map_location="cpu", weights_only=False)
        return {"format": 1, "step": int(state["step"]), "guard": list(state["guard"])}
    fix = "resume it with the windtunnel that wrote it, or start over (resume=false)"
    _, meta = load_versioned(
        found / "meta.json", {FORMAT: CheckpointMeta}, key="format", default=None,
        what="checkpoint", fix=fix, error=CheckpointMetaError,
    )  # fmt: skip
    return meta


def _check_shape(found: Path, meta: dict[str, Any], model: torch.nn.Module) -> None:
    saved, mine = meta.get("model_shape") or {}, _shape(model)
    diff = [f"{k} {saved[k]} vs {mine[k]}" for k in mine if k in saved and saved[k] != mine[k]]
    if diff:
        raise CheckpointError(
            f"checkpoint {found} was saved by a different model ({', '.join(diff)}): load it with "
            "the model it was trained with, or start this run over (resume=false)"
        )


def load(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``model``/``optimizer`` (any world size, any
    parallel mode); returns its meta (``step``, ``guard``, ...)."""
    found = resolve(path)
    if found is None:
        raise CheckpointError(f"no checkpoint at {path}")
    meta = read_meta(found)
    if found.suffix == ".pt":
        if world.distributed:
            raise CheckpointError(
                f"{found} is a single-file checkpoint of an older windtunnel: resume it on one "
                "process (train.nproc_per_node=1) once; its next checkpoint loads on any ranks"
            )
        state = torch.load(found, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return meta
    _check_shape(found, meta, model)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with _quiet():
        dcp_load(state, checkpoint_id=str(found))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return meta


def load_model(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load only the weights into an unsharded, unwrapped ``model`` in this process (export,
    inspection); returns the checkpoint's meta."""
    found = resolve(path)
    if found is None:
        raise CheckpointError(f"no checkpoint at {path}")
    meta = read_meta(found)
    if found.suffix == ".pt":
        model.load_state_dict(torch.load(found, map_location="cpu", weights_only=False)["model"])
        return meta
    _check_shape(found, meta, model)
    state = {"model": model.state_dict()}
    with _quiet():
        dcp_load(state, checkpoint_id=str(found))
    model.load_state_dict(state["model"])
    return meta
