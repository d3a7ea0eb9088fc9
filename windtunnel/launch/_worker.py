"""Run one pickled call in this process and write its `Outcome`: the local/pack worker.

    python -m windtunnel.launch._worker CALL.pkl RESULT.pkl

CALL.pkl holds the parent's ``sys.path`` (plain pickle) then ``(fn, args, kwargs)`` (cloudpickle),
so that functions importable in the parent are importable here. RESULT.pkl is written atomically.
Exit status: 0 the call returned, 1 it raised, 143 terminated (SIGTERM, after the preemption
callbacks ran); a worker killed by a signal writes nothing and the parent reports the signal.
SIGUSR2 is ignored here: in a packed SLURM job the job's main process handles preemption and
terminates its trial processes.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any

from windtunnel.files import atomic_write

EXIT_TERMINATED = 143


def write_call(path: Path, fn: Any, args: tuple, kwargs: dict) -> None:
    import cloudpickle

    with open(path, "wb") as f:
        pickle.dump(list(sys.path), f)
        cloudpickle.dump((fn, args, kwargs), f)


def write_outcome(path: Path, outcome: Any) -> None:
    import cloudpickle

    from windtunnel.launch.outcome import Outcome

    try:
        data = cloudpickle.dumps(outcome)
    except Exception as e:
        data = cloudpickle.dumps(
            Outcome(False, exc_type=type(e).__name__, message=f"trial result is not picklable: {e}")
        )
    atomic_write(path, data)


def read_outcome(path: Path) -> Any | None:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None


def _on_term(signum: int, frame: Any) -> None:
    ckpt = sys.modules.get("windtunnel.launch.checkpoint")  # callbacks exist only if imported
    if ckpt is not None:
        ckpt.run_preempt_callbacks()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_TERMINATED)


def main(argv: list[str]) -> int:
    call_path, result_path = Path(argv[0]), Path(argv[1])
    signal.signal(signal.SIGTERM, _on_term)
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    from windtunnel.launch.outcome import Outcome

    try:
        with open(call_path, "rb") as f:
            for p in pickle.load(f):
                if p not in sys.path:
                    sys.path.append(p)
            fn, args, kwargs = pickle.load(f)
    except Exception as e:
        outcome = Outcome.from_exception(e)
        outcome.message = f"could not load the call: {outcome.message}"
        write_outcome(result_path, outcome)
        return 1
    outcome = Outcome.capture(fn, args, kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    write_outcome(result_path, outcome)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
