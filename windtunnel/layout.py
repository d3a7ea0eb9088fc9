"""Can this run be laid out as asked? Checked before anything is built: the world size splits
the micro-batch, the estimate fits the GPU, FSDP is worth it. Each answer is one line."""

from __future__ import annotations

import sys

from windtunnel.config import Resolved, RunConfig
from windtunnel.distributed import World
from windtunnel.engine import fsdp_refusal, pick_device


def check_memory(res: Resolved, world: World) -> None:
    """On a GPU, refuse before building anything a run whose estimated peak memory per rank
    (:mod:`windtunnel.estimate`) exceeds the device's whole memory, saying what to change."""
    import torch

    device = pick_device(res.cfg.train.device, world)
    if device.type != "cuda":
        return
    from windtunnel.estimate import GPU, estimate

    props = torch.cuda.get_device_properties(device)
    gpu = GPU(name=props.name, peak_flops=1e15, memory_bytes=props.total_memory)
    est = estimate(res, gpu=gpu, world_size=world.size, margin=1.0)
    if not est.fits:
        raise ValueError(f"refused before training: {est.refusal()}")


def check_fsdp(res: Resolved, world: World) -> None:
    """FSDP on a model too small to shard usefully: refused on GPUs; on CPU (gloo, where tests
    shard micro proxies to check the mechanics) one warning line from rank 0."""
    refusal = fsdp_refusal(res, world.size)
    if not refusal:
        return
    if pick_device(res.cfg.train.device, world).type == "cuda":
        raise ValueError(refusal)
    if world.main:
        print(f"warning: {refusal}", file=sys.stderr)


def check_world(cfg: RunConfig, world: World) -> int:
    """The micro-batch (sequences per micro-step, all ranks together); refuses a world size
    that cannot split it evenly (the curve would then depend on the world size)."""
    o = cfg.optim
    micro = o.batch_size // o.grad_accum
    if micro % world.size:
        fits = [w for w in range(1, micro + 1) if micro % w == 0 and w <= 2 * world.size]
        raise ValueError(
            f"{world.size} ranks cannot split micro-batches of {micro} sequences "
            f"(optim.batch_size={o.batch_size} / optim.grad_accum={o.grad_accum}) evenly: "
            f"use a world size that divides {micro} (e.g. {fits[-1]}) or change the batch"
        )
    return micro
