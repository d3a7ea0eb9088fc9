"""One contract for every launcher (inline, local, slurm, ray), plus the pure parts of the layer.

The slurm and ray cases are integration tests: they run against the real single-node SLURM
cluster (``scripts/slurm.sh up``) and a real local Ray, shared by the whole session. Every wait
has a timeout: a dead job must be reported, never waited on for ever.

Regenerate the SLURM golden file with ``WINDTUNNEL_UPDATE_GOLDEN=1 pytest tests/test_launch.py -k golden``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import cloudpickle
import pytest

from windtunnel.launch import (
    CANCELLED,
    COMPLETED,
    FAILED,
    LAUNCHERS,
    OPTIONS,
    JobCancelled,
    JobFailed,
    LocalOptions,
    RayOptions,
    SlurmOptions,
    TrialError,
    demo,
    launcher_class,
    launcher_options,
    make_launcher,
)
from windtunnel.launch.checkpoint import Requeueable
from windtunnel.launch.outcome import Outcome
from windtunnel.launch.pack import PackRunner
from windtunnel.launch.slurm import sbatch_script, slurm_parameters

pytest_plugins = ["fixtures_services"]
pytestmark = pytest.mark.timeout(300)

GOLDEN = Path(__file__).parent / "golden" / "slurm_params.json"
WAIT = 60  # seconds: the longest any single wait in these tests may take

KINDS = [
    pytest.param("inline", id="inline"),
    pytest.param("local", id="local"),
    pytest.param("slurm", id="slurm", marks=pytest.mark.integration),
    pytest.param("ray", id="ray", marks=pytest.mark.integration),
]


# --- launchers, one per kind and packing, shared by the session -----------------------------------
@pytest.fixture(scope="session")
def _launchers():
    made: dict = {}
    yield made
    for launcher in made.values():
        launcher.close()


def _get(request, made: dict, kind: str, trials_per_job: int = 1):
    key = (kind, trials_per_job)
    if key not in made:
        opts: dict = {"name": kind, "trials_per_job": trials_per_job}
        if kind == "slurm":
            request.getfixturevalue("slurm_cluster")
            opts.update(
                folder=str(request.getfixturevalue("submitit_root")),
                timeout_min=30,
                poll_interval_s=0.5,
            )
        elif kind == "ray":
            request.getfixturevalue("ray_local")
        elif kind == "local":
            opts["max_workers"] = max(2, os.cpu_count() or 1)
            opts["oversubscribe"] = True
        made[key] = make_launcher(**opts)
    return made[key]


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def launcher(request, kind, _launchers):
    return _get(request, _launchers, kind)


@pytest.fixture
def packed_launcher(request, kind, _launchers):
    return _get(request, _launchers, kind, trials_per_job=2)


def _wait_file(path: Path, timeout: float = WAIT) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)
    return path.read_text()


def _wait_state(job, states, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while job.state not in states:
        assert time.monotonic() < deadline, f"{job} not in {states} within {timeout} s"
        time.sleep(0.1)


# --- the contract ----------------------------------------------------------------------------------
def test_submit_returns_result(launcher):
    job = launcher.submit(demo.add, 2, b=3)
    assert isinstance(job.job_id, str) and job.job_id
    assert job.result(timeout=WAIT) == 5
    assert job.done()
    assert job.state == COMPLETED
    assert job.exception(timeout=WAIT) is None
    assert job.reason is None


def test_exception_carries_trial_traceback(launcher):
    job = launcher.submit(demo.fail, "bad value 42")
    with pytest.raises(TrialError) as info:
        job.result(timeout=WAIT)
    e = info.value
    assert e.exc_type == "ValueError"
    assert e.reason == "trial raised ValueError: bad value 42"
    assert "raise ValueError(message)" in e.traceback  # the trial's own source line
    assert "demo.py" in str(e) and "bad value 42" in str(e)
    assert job.state == FAILED
    assert isinstance(job.exception(timeout=WAIT), TrialError)


def test_map_array_keeps_order(launcher):
    # later elements finish first where jobs run in parallel
    args = [(0.2 * (3 - i), i) for i in range(4)]
    jobs = launcher.map_array(demo.sleep_then, args)
    assert [j.result(timeout=WAIT) for j in jobs] == [0, 1, 2, 3]
    assert len({j.job_id for j in jobs}) == 4
    assert launcher.map_array(demo.add, []) == []
    assert [j.result(timeout=WAIT) for j in launcher.map_array(demo.add, [1, 2])] == [1, 2]


def test_packed_trials(packed_launcher, kind):
    jobs = packed_launcher.map_array(demo.add, [(1, 2), (1, "x"), (3, 4)])
    assert jobs[0].result(timeout=WAIT) == 3
    with pytest.raises(TrialError, match="TypeError"):
        jobs[1].result(timeout=WAIT)  # one failing trial does not fail the others in its job
    assert jobs[2].result(timeout=WAIT) == 7
    if kind != "inline":  # each trial its own process, told its place in the pack
        idx = packed_launcher.map_array(demo.env_value, ["WINDTUNNEL_PACK_INDEX"] * 3)
        assert [j.result(timeout=WAIT) for j in idx] == ["0", "1", "0"]
        assert idx[0].job_id.rsplit(".", 1)[0] == idx[1].job_id.rsplit(".", 1)[0]


def test_cancel(launcher, kind):
    if kind == "inline":
        job = launcher.submit(demo.add, 1)
        job.cancel()  # ran at submit: cancel is a no-op
        assert job.result(timeout=WAIT) == 1
        return
    job = launcher.submit(demo.sleep_then, 120, "never")
    if kind == "slurm":
        _wait_state(job, {"RUNNING"})
    else:
        time.sleep(0.3)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(timeout=WAIT)
    assert job.state == CANCELLED
    assert job.done()


def test_result_timeout_does_not_hang(launcher, kind):
    if kind == "inline":
        pytest.skip("inline jobs are finished at submit")
    job = launcher.submit(demo.sleep_then, 120)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        job.result(timeout=0.5)
    assert time.monotonic() - t0 < 5
    job.cancel()
    with pytest.raises(JobFailed):
        job.result(timeout=WAIT)


def test_killed_job_is_reported_failed(launcher, kind, tmp_path):
    if kind == "inline":
        pytest.skip("inline jobs run in the test process")
    pid_file = tmp_path / "pid"
    job = launcher.submit(demo.pid_then_sleep, str(pid_file), 120)
    pid = int(_wait_file(pid_file))
    if kind == "slurm":
        subprocess.run(["scancel", job.job_id], check=True, timeout=30)  # killed from outside
    else:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=WAIT)
    e = info.value
    assert not isinstance(e, (TrialError, JobCancelled))
    expected = {"local": "killed by SIGKILL", "ray": "ray worker died", "slurm": "CANCELLED"}[kind]
    assert expected in e.reason
    assert job.state == FAILED
    assert job.reason == e.reason


@pytest.mark.parametrize("name", ["inline", "local", "slurm", "ray"])
def test_unknown_option_refused(name):
    with pytest.raises(
        ValueError, match=rf"^launcher.frobnicate is not an option of launcher={name}; its options"
    ) as info:
        make_launcher(name=name, frobnicate=1)
    assert "trials_per_job" in str(info.value)
    # an option of another launcher, set on this one
    foreign = {"inline": "max_workers", "local": "partition", "slurm": "address", "ray": "qos"}[
        name
    ]
    value = {"max_workers": 2, "partition": "gpu", "address": "auto", "qos": "high"}[foreign]
    with pytest.raises(
        ValueError, match=rf"^launcher.{foreign} is not an option of launcher={name} \(it is"
    ) as info:
        make_launcher({"name": name, foreign: value})
    assert str(info.value).endswith("its options: " + ", ".join(OPTIONS[name].option_names()))


def test_local_workers_are_prewarmed_and_see_the_current_environment(monkeypatch):
    """Workers fork from a process that imported torch (no 3 s start-up per trial), yet each is
    its own process group and takes the environment of the moment it was submitted."""
    with (
        make_launcher(name="local", max_workers=1) as warm,
        make_launcher(name="local", max_workers=1, prewarm=False) as cold,
    ):
        monkeypatch.setenv("WT_TEST_SUBMIT_ENV", "set after the launcher started")
        for launcher, torch_imported in ((warm, True), (cold, False)):
            facts = launcher.submit(demo.process_facts).result(timeout=WAIT)
            assert facts == {"torch_imported": torch_imported, "own_group": True}
            value = launcher.submit(demo.env_value, "WT_TEST_SUBMIT_ENV").result(timeout=WAIT)
            assert value == "set after the launcher started"


def test_local_launcher_survives_the_loss_of_its_prewarmed_process(tmp_path):
    """The process that forks workers dies: its running job fails (never hangs) and is killed
    rather than orphaned, and later jobs start as fresh processes."""
    with make_launcher(name="local", max_workers=1) as launcher:
        pid_file = tmp_path / "pid"
        job = launcher.submit(demo.pid_then_sleep, str(pid_file), 120)
        pid = int(_wait_file(pid_file))
        launcher._zygote._proc.kill()
        with pytest.raises(JobFailed):
            job.result(timeout=WAIT)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", "worker left running"
        with pytest.warns(UserWarning, match="fresh processes"):
            assert launcher.submit(demo.add, 2, 3).result(timeout=WAIT) == 5


# --- pure parts ------------------------------------------------------------------------------------
def test_launcher_config_with_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "inline", "trials_per_job": 2})
    launcher = make_launcher(cfg)
    assert launcher.name == "inline" and launcher.trials_per_job == 2
    with pytest.raises(
        ValueError, match=r"launcher\.partitoin is not an option of launcher=local;"
    ):
        make_launcher({"name": "local", "partitoin": "gpu"})
    with pytest.raises(ValueError, match="unknown launcher 'kubernetes'; valid launchers: inline"):
        make_launcher(name="kubernetes")


def _conf_launcher(name: str) -> dict:
    import yaml

    root = Path(__file__).parents[1] / "conf" / "launcher"
    return yaml.safe_load((root / f"{name}.yaml").read_text())


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("inline", {"trials_per_job": 3}, {"trials_per_job": 3}),
        (
            "local",
            {"trials_per_job": 8, "prewarm": False, "max_workers": "4", "oversubscribe": True},
            {"trials_per_job": 8, "prewarm": False, "max_workers": 4, "oversubscribe": True},
        ),
        (
            "slurm",
            {"partition": "gpu", "gpus_per_node": 1, "timeout_min": "120", "trials_per_job": 8,
             "setup": ["module load cuda"], "extra_sbatch": {"exclusive": True}, "folder": "/f"},
            {"partition": "gpu", "gpus_per_node": 1, "timeout_min": 120, "trials_per_job": 8,
             "setup": ["module load cuda"], "extra_sbatch": {"exclusive": True}, "folder": "/f",
             "cpus_per_task": 1, "mem_gb": 2.0, "job_name": "windtunnel"},
        ),
        (
            "ray",
            {"address": "ray://head:10001", "gpus_per_task": 0.5, "cpus_per_task": 2},
            {"address": "ray://head:10001", "gpus_per_task": 0.5, "cpus_per_task": 2},
        ),
    ],
)  # fmt: skip
def test_launcher_options_of_each_backend(name, overrides, expected):
    """conf/launcher/<name>.yaml plus the overrides users type -> the backend's typed options
    (values converted to the fields' types)."""
    opts = launcher_options({**_conf_launcher(name), **overrides})
    assert type(opts) is OPTIONS[name] and opts.name == name
    assert {k: getattr(opts, k) for k in expected} == expected
    assert launcher_options(opts) == opts  # typed options pass through
    assert launcher_options(opts.as_dict()) == opts
    assert launcher_class(name).Options is OPTIONS[name]
    for field in opts.option_names():
        assert OPTIONS[name].__dataclass_fields__[field].kw_only


def test_launcher_options_refusals():
    with pytest.raises(ValueError) as info:
        launcher_options({"name": "local", "partition": "gpu"})
    assert str(info.value) == (
        "launcher.partition is not an option of launcher=local (it is an option of "
        "launcher=slurm); its options: folder, max_workers, oversubscribe, prewarm, trials_per_job"
    )
    with pytest.raises(ValueError, match=r"^launcher.address, launcher.qos are not options of "):
        launcher_options({"name": "inline", "address": "auto", "qos": "high"})
    with pytest.raises(ValueError, match="unknown launcher 'k8s'; valid launchers: inline, local"):
        launcher_options({"name": "k8s"})
    with pytest.raises(ValueError, match=r"bad value of launcher\.timeout_min for launcher=slurm"):
        launcher_options({"name": "slurm", "timeout_min": "two hours"})
    with pytest.raises(ValueError, match="trials_per_job must be >= 1"):
        launcher_options(name="local", trials_per_job=0)
    with pytest.raises(ValueError, match="LocalOptions is for launcher=local"):
        LocalOptions(name="slurm")
    assert launcher_options() == LocalOptions()  # no name: local
    assert RayOptions(address="auto").as_dict(changed_only=True) == {
        "name": "ray",
        "address": "auto",
    }


def test_launch_registry_imports_lazily():
    """The registry lives in windtunnel.launch; base imports no implementation and importing the
    package pulls in no backend (nor submitit, ray, omegaconf or torch)."""
    code = (
        "import sys, windtunnel.launch.base, windtunnel.launch;"
        "print(sorted(m for m in sys.modules if m.startswith(('windtunnel.launch.', 'submitit',"
        " 'ray', 'omegaconf', 'torch'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert (
        out.strip()
        == "['windtunnel.launch.base', 'windtunnel.launch.options', 'windtunnel.launch.outcome']"
    )
    assert set(LAUNCHERS) == set(OPTIONS)
    for name in LAUNCHERS:
        assert launcher_class(name).name == name


def test_local_caps_workers_at_cores():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launcher = make_launcher(name="local", max_workers=10_000)
    try:
        assert launcher.max_workers == len(os.sched_getaffinity(0))
        assert any("capped" in str(w.message) for w in caught)
    finally:
        launcher.close()


GOLDEN_CASES = {
    "defaults": {},
    "gpu_node": {
        "partition": "gpu",
        "gpus_per_node": 8,
        "cpus_per_task": 32,
        "mem_gb": 256,
        "timeout_min": 240,
        "account": "lm-pretrain",
        "qos": "high",
        "constraint": "h100",
        "setup": ["module load cuda/12.4", "source .venv/bin/activate"],
        "extra_sbatch": {"exclusive": True, "mail-type": "END"},
        "job_name": "wt-mup",
        "signal_delay_s": 120,
    },
    "array_capped": {
        "partition": "low",
        "array_parallelism": 4,
        "timeout_min": 5,
        "signal_delay_s": 30,
    },
    "packed": {"trials_per_job": 4, "gpus_per_node": 1, "mem_gb": 1.5},
    # the full run: one trial on 16 nodes x 8 GPUs, one task (rank) per GPU
    "multi_node": {
        "partition": "gpu",
        "nodes": 16,
        "gpus_per_node": 8,
        "cpus_per_task": 12,
        "timeout_min": 1440,
        "job_name": "wt-full",
    },
    # a trial of 2 ranks on a CPU node (what the integration tests run)
    "two_tasks_cpu": {"tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 30},
}


def _golden_entry(options: dict) -> dict:
    params = slurm_parameters(options)
    map_count = 16 if "array_parallelism" in options else None
    text = sbatch_script(
        params, "/SUBMITIT", "python -u -m submitit.core._submit /SUBMITIT", map_count
    )
    return {"options": options, "params": params, "sbatch": text.splitlines()}


def test_slurm_parameters_golden():
    entries = {name: _golden_entry(opts) for name, opts in GOLDEN_CASES.items()}
    if os.environ.get("WINDTUNNEL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert entries == expected, "SLURM parameters changed: WINDTUNNEL_UPDATE_GOLDEN=1 regenerates"


OPTION_SAMPLES = {  # a valid, non-default value of every launcher option
    "trials_per_job": 2,
    "max_workers": 2,
    "oversubscribe": True,
    "prewarm": False,
    "folder": "/tmp/jobs",
    "job_name": "wt",
    "partition": "gpu",
    "gpus_per_node": 1,
    "nodes": 2,
    "tasks_per_node": 2,
    "cpus_per_task": 2,
    "mem_gb": 1.5,
    "timeout_min": 30,
    "array_parallelism": 2,
    "account": "lm",
    "qos": "high",
    "constraint": "h100",
    "setup": ["true"],
    "extra_sbatch": {"exclusive": True},
    "signal_delay_s": 60,
    "max_num_timeout": 2,
    "checkpointable": False,
    "python": "python3",
    "poll_interval_s": 1.0,
    "address": "auto",
    "gpus_per_task": 0.5,
}


def test_slurm_parameters_pure_and_validated():
    cfg = SlurmOptions(
        partition="gpu",
        timeout_min=30,
        setup=["module load cuda"],
        extra_sbatch={"exclusive": True},
    )
    before = copy.deepcopy(cfg)
    expected = {
        "job_name": "windtunnel",
        "time": 30,
        "nodes": 1,
        "ntasks_per_node": 1,
        "signal_delay_s": 90,
        "partition": "gpu",
        "setup": ["module load cuda"],
        "additional_parameters": {"exclusive": True},
    }
    first = slurm_parameters(cfg)
    assert first == expected
    # pure: the config is left as it was, and the result shares nothing with it or with later
    # calls (a launcher editing its parameters must not change the config or the next launcher)
    first["setup"].append("module load gcc")
    first["additional_parameters"]["mail-type"] = "END"
    first["time"] = 1
    assert cfg == before
    assert slurm_parameters(cfg) == expected
    slurm_parameters({"timeout_min": 5, "partition": "low", "setup": ["true"]})
    assert slurm_parameters(cfg) == expected  # nothing carried over from another call
    with pytest.raises(ValueError, match=r"launcher\.address is not an option of launcher=slurm"):
        slurm_parameters({"partition": "gpu", "address": "auto"})
    with pytest.raises(ValueError, match="not slurm launcher options"):
        slurm_parameters({"name": "local"})
    with pytest.raises(ValueError, match="shorter than the time limit"):
        slurm_parameters({"timeout_min": 1})
    with pytest.raises(ValueError, match="use the launcher option"):
        slurm_parameters({"extra_sbatch": {"partition": "x"}})
    # validated against exactly the options the slurm launcher takes: every one is accepted (from
    # typed options as from a plain mapping), and every other launcher's option is refused
    slurm_fields = {f.name for f in dataclasses.fields(SlurmOptions)} - {"name"}
    other = {f.name for o in OPTIONS.values() for f in dataclasses.fields(o)} - slurm_fields
    assert set(OPTION_SAMPLES) == (slurm_fields | other) - {"name"}
    for option, value in OPTION_SAMPLES.items():
        if option in slurm_fields:
            from_cfg = slurm_parameters(SlurmOptions(**{option: value}))
            assert slurm_parameters({option: value}) == from_cfg
        else:
            with pytest.raises(ValueError, match=option):  # the refusal names the option
                slurm_parameters({option: value})
    assert other - {"name"} == {
        "max_workers",
        "oversubscribe",
        "prewarm",
        "address",
        "gpus_per_task",
    }


def test_requeueable_checkpoint_requeues_same_call(tmp_path):
    fn = Requeueable(demo.resumable_count)
    ran = []
    from windtunnel.launch.checkpoint import on_preempt, preempted

    on_preempt(lambda: ran.append(1))
    delayed = fn.checkpoint(str(tmp_path), 3, step_s=0)
    assert ran == [1] and preempted()
    delayed = pickle.loads(cloudpickle.dumps(delayed))
    assert delayed.args == (str(tmp_path), 3) and delayed.kwargs == {"step_s": 0}
    first = delayed.result()
    assert first == {"total": 14, "steps": 3, "starts": 1, "start_steps": [0]}
    again = Requeueable(demo.resumable_count)(str(tmp_path), 3, step_s=0)  # resumes: nothing left
    assert again == {"total": 14, "steps": 3, "starts": 2, "start_steps": [0, 3]}


def test_pack_checkpoint_keeps_finished_trials():
    """What submitit does on SIGUSR2, in this process: the handler calls `checkpoint()` inside
    the running pack and exits; the pickled pack keeps the finished trial's outcome."""
    runner = PackRunner([(demo.add, (1, 2), {}), (demo.sleep_then, (60,), {})])
    saved: list = []

    def handler(signum, frame):
        saved.append(cloudpickle.dumps(runner.checkpoint()))
        raise SystemExit(-1)

    def preempt_when_first_done():
        deadline = time.monotonic() + WAIT
        while runner.outcomes[0] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        threading.Thread(target=preempt_when_first_done, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(SystemExit):
            runner()
        assert time.monotonic() - t0 < 30  # the sleeping trial was stopped, not waited for
    finally:
        signal.signal(signal.SIGUSR2, previous)
    requeued = pickle.loads(saved[0]).function
    assert requeued.outcomes[0] == Outcome(True, 3)
    assert requeued.outcomes[1] is None  # runs again after the requeue
