"""One run on 1 vs 2 ranks at the same global batch: tokens/s, and the cost of DDP / FSDP.

    .venv/bin/python benchmarks/bench_ranks.py                    # micro_m, 16 × 256 tokens/step
    .venv/bin/python benchmarks/bench_ranks.py --model micro_l --tokens 400000

Each layout trains the same run (``windtunnel train``, embedded corpus, journal only) in a fresh
folder; tokens/s is the median of the journal's ``throughput/tokens_per_s`` after the first
tenth of the run (warm-up and the first evaluation excluded); wall is the whole command,
start-up included. On a CPU machine the ranks share its cores (each rank gets cores / W
threads), so this measures the overhead of the data-parallel machinery, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {
    "1 process": [],
    "2 ranks, ddp": ["train.nproc_per_node=2", "train.parallel=ddp"],
    "2 ranks, fsdp": ["train.nproc_per_node=2", "train.parallel=fsdp"],
}


def run(model: str, tokens: int, extra: list[str], root: Path) -> tuple[float, float, float]:
    """(median tokens/s, wall seconds, final val_loss) of one layout."""
    overrides = [
        f"model={model}",
        "data.seq_len=256",
        "optim.batch_size=16",
        f"train.tokens={tokens}",
        "train.progress=false",
        "tracker=jsonl",
        f"run_dir={root}",
        "name=bench",
        *extra,
    ]
    env = {**os.environ, "WINDTUNNEL_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "windtunnel", "train", *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{extra}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    points = []
    for line in (root / "bench" / "journal.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev.get("ev") == "metrics" and "throughput/tokens_per_s" in ev["values"]:
            points.append((ev["step"], ev["values"]["throughput/tokens_per_s"]))
    steady = [v for step, v in points if step > tokens / 10]
    return statistics.median(steady), wall, result["val_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="micro_m")
    ap.add_argument("--tokens", type=int, default=262144)
    args = ap.parse_args()
    print(f"# {platform.node()} · {os.cpu_count()} cores · model {args.model} · {args.tokens} tok")
    print("| layout | tokens/s | vs 1 process | wall s | final val_loss |")
    print("|---|---|---|---|---|")
    base = None
    for name, extra in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            tps, wall, loss = run(args.model, args.tokens, extra, Path(tmp))
        base = base or tps
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f} | {wall:.1f} | {loss:.6f} |", flush=True)


if __name__ == "__main__":
    main()
