"""The Ray launcher: each job is a Ray task, on a local Ray or an existing cluster.

``address`` None or "local" starts a private local Ray (``ray.init(address="local")``, so that a
leftover ``ray_current_cluster`` file cannot capture it) with ``max_workers`` CPUs (default: all);
any other address joins that cluster. If Ray is already initialized in this process it is used
as is. The launcher shuts down only a Ray it started (`close`).

Tasks are never retried by Ray (``max_retries=0``): a worker that dies is reported as a failed job
with Ray's reason; ``cancel()`` force-cancels the task (its worker process is killed).
"""

from __future__ import annotations

import os
from typing import Any

from windtunnel.launch.base import (
    CANCELLED,
    COMPLETED,
    FAILED,
    RUNNING,
    Call,
    JobHandle,
    Launcher,
)
from windtunnel.launch.options import RayOptions
from windtunnel.launch.outcome import Outcome

RAY_ENV = {
    # stay on loopback: Ray otherwise rewrites 127.0.0.1 to the machine's other address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray 2.60 asks for an auth token by default
    "RAY_AUTH_MODE": "disabled",
}


def _run_call(fn: Any, args: tuple, kwargs: dict) -> Outcome:
    return Outcome.capture(fn, args, kwargs)


class RayJobHandle(JobHandle):
    def __init__(self, ref: Any) -> None:
        self._ref = ref
        self.job_id = f"ray-{ref.task_id().hex()[:16]}"
        self._outcome: Outcome | None = None
        self._cancel_requested = False

    @property
    def ref(self) -> Any:
        return self._ref

    @property
    def state(self) -> str:
        if not self.done():
            return RUNNING  # Ray does not cheaply tell queued from running
        out = self._wait_outcome(0)
        if out.cancelled:
            return CANCELLED
        return COMPLETED if out.ok else FAILED

    def done(self) -> bool:
        if self._outcome is not None:
            return True
        import ray

        ready, _ = ray.wait([self._ref], timeout=0)
        return bool(ready)

    def _wait_outcome(self, timeout: float | None) -> Outcome:
        if self._outcome is not None:
            return self._outcome
        import ray
        from ray import exceptions as rex

        try:
            out = ray.get(self._ref, timeout=timeout)
        except rex.GetTimeoutError:
            raise TimeoutError(f"job {self.job_id} still running after {timeout} s") from None
        except rex.TaskCancelledError:
            out = (
                Outcome.cancel()
                if self._cancel_requested
                else Outcome.failed("ray task was cancelled")
            )
        except rex.RayTaskError as e:  # the task failed outside the trial call
            out = Outcome(False, exc_type=type(e.cause).__name__ if e.cause else "RayTaskError",
                          message=str(e.cause or e).splitlines()[0], traceback=str(e))  # fmt: skip
        except rex.RayError as e:  # worker crashed, node died, object lost, ...
            if self._cancel_requested:
                out = Outcome.cancel()
            else:
                first = (str(e).strip().splitlines() or [""])[0]
                out = Outcome.failed(f"ray worker died ({type(e).__name__}): {first}", log=str(e))
        self._outcome = out
        return out

    def cancel(self) -> None:
        if self.done():
            return
        import ray

        self._cancel_requested = True
        ray.cancel(self._ref, force=True)


class RayLauncher(Launcher):
    """Ray tasks; see the module docstring."""

    name = "ray"
    Options = RayOptions
    options: RayOptions

    def __init__(self, options: RayOptions | None = None) -> None:
        super().__init__(options)
        options = self.options
        for k, v in RAY_ENV.items():
            os.environ.setdefault(k, v)
        import ray

        self._owns_ray = False
        if not ray.is_initialized():
            address = options.address or "local"
            init: dict[str, Any] = {"address": address, "include_dashboard": False}
            if address == "local" and options.max_workers:
                init["num_cpus"] = int(options.max_workers)
            ray.init(**init)
            self._owns_ray = True
        cpus = options.cpus_per_task or self.trials_per_job
        self._remote = ray.remote(_run_call).options(
            num_cpus=cpus, num_gpus=options.gpus_per_task or 0, max_retries=0
        )

    def _submit_calls(self, calls: list[Call]) -> list[JobHandle]:
        return [RayJobHandle(self._remote.remote(fn, args, kwargs)) for fn, args, kwargs in calls]

    def close(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
