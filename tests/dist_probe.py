"""Run by tests/test_distributed.py under torchrun: the engine's μP groups and init on this rank,
as one JSON file per rank in $WT_PROBE_OUT (full tensors, so ranks of a sharded model can be compared)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from windtunnel.compose import compose_run
from windtunnel.config import resolve
from windtunnel.distributed import process_group, world_from_env
from windtunnel.engine import Engine


def main(overrides: list[str]) -> None:
    cfg = compose_run(overrides)
    res = resolve(cfg, cfg.data.vocab_size)
    world = world_from_env()
    with process_group(world, torch.device("cpu")):
        engine = Engine.build(res, lambda step, micro: (None, None), world)
        groups = []
        for g in engine.optimizer.param_groups:
            full = [
                p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in g["params"]
            ]
            groups.append(
                {
                    "name": g["name"],
                    "lr": g["lr"],
                    "lr_scale": g["lr_scale"],
                    "weight_decay": g["weight_decay"],
                    "numel": sum(t.numel() for t in full),
                    "sum_sq": sum(float(t.double().pow(2).sum()) for t in full),
                }
            )
        wrapped = type(engine.net).__name__
        del engine  # DDP's reducer goes before its process group
    out = Path(os.environ["WT_PROBE_OUT"]) / f"rank{world.rank}.json"
    out.write_text(json.dumps({"rank": world.rank, "net": wrapped, "groups": groups}))


if __name__ == "__main__":
    main(sys.argv[1:])
