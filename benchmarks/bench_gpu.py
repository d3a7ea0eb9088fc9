"""GPU measurements: engine throughput/MFU, SDPA kernels, and packed trials sharing one GPU.

Run on a machine with one CUDA GPU (results in docs/benchmarks.md):

    python benchmarks/bench_gpu.py --out results/          # all three parts
    python benchmarks/bench_gpu.py --parts packed           # one part

Parts:
  throughput  windtunnel's real training step (bf16 autocast, μP groups, clipping) for the
              MiniCPM proxies, eager and torch.compile, against a plain PyTorch loop; MFU is
              achieved FLOP/s (exact matmul count) over the measured bf16 matmul peak.
  sdpa        the same step with each of PyTorch's SDPA kernels forced (flash, efficient,
              cuDNN, math). flash-attn itself is used when importable (``pip install
              windtunnel[gpu]``); where it is absent this part says so.
  packed      k ``windtunnel train`` processes of one proxy on the same GPU at once (what a
              launcher with ``trials_per_job=k`` does) against one alone: aggregate tokens/s,
              wall time included (process start, data, eval).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from windtunnel.bench import bench_model, matmul_peak, run_bench  # noqa: E402
from windtunnel.compose import compose_run as compose  # noqa: E402

SHAPE = ["data.vocab_size=122753", "data.seq_len=2048", "optim.batch_size=8", "tracker=none"]
MODELS = ["minicpm_9m", "minicpm_0p1b", "minicpm_0p5b"]


def part_throughput(steps: int) -> dict[str, Any]:
    cfg = compose([*SHAPE, "train.device=cuda"])
    report = run_bench(cfg, models=MODELS, steps=steps, baseline=True, compiled=True)
    print(report.table(), flush=True)
    return report.to_json()


def part_sdpa(steps: int) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    peak = matmul_peak(torch.device("cuda"))
    out: dict[str, Any] = {"peak": peak, "rows": {}}
    for name in ("minicpm_9m", "minicpm_0p1b"):
        cfg = compose([*SHAPE, "train.device=cuda", "train.attention=sdpa", f"model={name}"])
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)
        )
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    row = bench_model(cfg, steps=steps, baseline=False, peak=peak, compiled=False)
                res = {"tokens_per_s": row.tokens_per_s, "mfu": row.share_of_peak}
            except Exception as e:  # a kernel that refuses this shape is a result too
                res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            out["rows"][f"{name}/{backend}"] = res
            print(f"{name:<14}{backend:<22}{res}", flush=True)
    try:
        import flash_attn  # noqa: F401

        out["flash_attn"] = "installed"
    except ImportError:
        out["flash_attn"] = "not installed on this machine: only SDPA's kernels measured"
    print(out["flash_attn"], flush=True)
    return out


def part_packed(
    model: str, tokens: int, ks: list[int], work: Path, device: str = "cuda"
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    base = [
        sys.executable,
        "-m",
        "windtunnel",
        "train",
        f"model={model}",
        "data.seq_len=512",
        "optim.batch_size=32",
        f"train.tokens={tokens}",
        f"train.eval_every_tokens={tokens // 2}",
        f"train.device={device}",
        "train.progress=false",
        "tracker=none",
        f"tracker.home={work}",
    ]
    subprocess.run([sys.executable, "-m", "windtunnel", "prepare"], env=env, check=True)
    out: dict[str, Any] = {"model": model, "tokens_per_trial": tokens, "rows": []}
    for k in ks:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [*base, f"name=packed-{model}-k{k}-{i}", f"train.seed={i}"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for i in range(k)
        ]
        results = []
        for p in procs:
            stdout, _ = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"packed trial failed (rc {p.returncode}): {stdout[-2000:]}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        wall = time.perf_counter() - t0
        row = {
            "k": k,
            "wall_s": wall,
            "aggregate_tokens_per_s": k * tokens / wall,
            "train_seconds": [r["seconds"] for r in results],
            "val_bpb": [r["val_bpb"] for r in results],
        }
        out["rows"].append(row)
        print(
            f"k={k}: wall {wall:.1f}s, aggregate {row['aggregate_tokens_per_s']:,.0f} tok/s, "
            f"per-trial train s {[round(s, 1) for s in row['train_seconds']]}",
            flush=True,
        )
    one = out["rows"][0]["aggregate_tokens_per_s"]
    for row in out["rows"]:
        row["speedup_vs_one"] = row["aggregate_tokens_per_s"] / one
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["throughput", "sdpa", "packed"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--packed-model", default="minicpm_9m")
    ap.add_argument("--packed-tokens", type=int, default=16384 * 200)
    ap.add_argument("--packed-k", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for part in args.parts:
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "throughput":
            results[part] = part_throughput(args.steps)
        elif part == "sdpa":
            results[part] = part_sdpa(args.steps)
        elif part == "packed":
            results[part] = part_packed(
                args.packed_model, args.packed_tokens, args.packed_k, args.out / "packed-home"
            )
        print(f"== {part} took {time.perf_counter() - t0:.0f}s", flush=True)
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
