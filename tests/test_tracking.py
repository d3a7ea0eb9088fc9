"""windtunnel.tracking: one contract suite over every tracker kind, then MLflow specifics
(server unreachable, replay exactly once, server reuse) against a real local server."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from windtunnel.config import TrackerConfig
from windtunnel.tracking import (
    Run,
    Tracker,
    flatten_params,
    mlflow_ui_url,
    open_tracker,
    replay_journal,
)
from windtunnel.tracking.journal import iter_events

if TYPE_CHECKING:
    from fixtures_mlflow import MlflowServer, TcpProxy

pytest_plugins = ["fixtures_mlflow"]


def free_port() -> int:
    from fixtures_mlflow import free_port  # imported by pytest as a plugin (asserts rewritten)

    return free_port()


BIG = 2**31 + 5  # beyond a 32-bit step: MLflow stores int64
STEPS = [0, 1000, BIG, 3 * 2**32]

# ----------------------------------------------------------------------------------------------
# reading back what a tracker recorded (journal for jsonl, the MLflow server for mlflow)
# ----------------------------------------------------------------------------------------------


@dataclass
class Recorded:
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, list[tuple[int, float]]]
    status: str | None
    artifacts: set[str] = field(default_factory=set)
    parent: str | None = None
    error: str | None = None


def _from_journal(run: Any) -> Recorded:
    rec = Recorded({}, {}, {}, None)
    for ev, _ in iter_events(run.journal_path):
        if ev["ev"] == "start":
            rec = Recorded(ev["params"], dict(ev["tags"]), {}, "RUNNING", parent=ev["parent"])
        elif ev["ev"] in ("tags", "resume"):
            rec.tags.update(ev["tags"])
            rec.status = "RUNNING"
        elif ev["ev"] == "metrics":
            for k, v in ev["values"].items():
                rec.metrics.setdefault(k, []).append((ev["step"], v))
        elif ev["ev"] == "dict":
            rec.artifacts.add(ev["file"])
        elif ev["ev"] == "artifact":
            rec.artifacts.add(Path(ev["path"]).name)
        elif ev["ev"] == "finish":
            rec.status, rec.error = ev["status"], ev["error"]
    return rec


def _from_mlflow(uri: str, mlflow_run_id: str) -> Recorded:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    r = client.get_run(mlflow_run_id)
    metrics = {
        k: sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run_id, k))
        for k in r.data.metrics
    }
    return Recorded(
        params=r.data.params,
        tags=r.data.tags,
        metrics=metrics,
        status=r.info.status,
        artifacts={a.path for a in client.list_artifacts(mlflow_run_id)},
        parent=r.data.tags.get("mlflow.parentRunId"),
        error=r.data.tags.get("wt.failure"),
    )


def recorded(kind: str, tracker: Tracker, run: Any) -> Recorded | None:
    if kind == "null":
        return None
    if kind == "jsonl":
        return _from_journal(run)
    assert run.mlflow_run_id, "the run should have reached the server"
    return _from_mlflow(tracker.tracking_uri, run.mlflow_run_id)


def abandon(run: Any) -> None:
    """What SIGKILL leaves: no finish event, file handles and the flock gone."""
    run._f.close()
    if run._lock is not None:
        run._lock.release()


def history(uri: str, mlflow_run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted(
        (m.step, m.value) for m in MlflowClient(uri).get_metric_history(mlflow_run_id, key)
    )


# ----------------------------------------------------------------------------------------------
# the contract: same assertions for every kind
# ----------------------------------------------------------------------------------------------

KINDS = ["null", "jsonl", pytest.param("mlflow", marks=pytest.mark.integration)]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tracker(kind: str, request: pytest.FixtureRequest) -> Tracker:
    if kind == "mlflow":
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        return open_tracker(server.cfg(kind="mlflow", flush_every=3))
    return open_tracker(TrackerConfig(kind=kind, flush_every=3))


def test_contract_full_run(kind: str, tracker: Tracker, tmp_path: Path) -> None:
    assert isinstance(tracker, Tracker)
    assert (
        tracker.tracking_uri.startswith("http") if kind == "mlflow" else tracker.tracking_uri == ""
    )
    params = {"model": {"d_model": 64, "n_layers": 2, "shape": [1, 2]}, "note": "x" * 7000}
    run = tracker.start_run(
        run_dir=tmp_path / "r", name="r1", params=params, tags={"stage": "ladder"}
    )
    assert isinstance(run, Run) and isinstance(run.run_id, str) and run.run_id
    for i, step in enumerate(STEPS):
        run.log_metrics({"loss": 4.0 - i, "tokens": float(step)}, step=step)
    run.set_tags({"wt.phase": "decay"})
    run.log_dict({"model": {"d_model": 64}}, "config.yaml")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    run.log_artifact(notes)
    run.flush()
    run.finish()
    run.finish()  # idempotent
    run.log_metrics({"loss": 0.0}, step=99)  # after finish: ignored, never raises

    rec = recorded(kind, tracker, run)
    if rec is None:
        return
    assert rec.metrics["loss"] == [(s, 4.0 - i) for i, s in enumerate(STEPS)]
    assert rec.metrics["tokens"] == [(s, float(s)) for s in STEPS]
    assert rec.params["model.d_model"] == "64"
    assert json.loads(rec.params["model.shape"]) == [1, 2]
    assert rec.params["note"].startswith("xxx") and 6000 <= len(rec.params["note"]) <= 7000
    assert rec.tags["stage"] == "ladder" and rec.tags["wt.phase"] == "decay"
    assert rec.status == "FINISHED"
    assert {"config.yaml", "notes.txt"} <= rec.artifacts


def test_contract_bad_input_raises_value_error(tracker: Tracker, tmp_path: Path) -> None:
    run = tracker.start_run(run_dir=tmp_path / "r", name="bad", params={}, tags={})
    with pytest.raises(ValueError, match="step"):
        run.log_metrics({"loss": 1.0}, step=-1)
    with pytest.raises(ValueError, match="step"):
        run.log_metrics({"loss": 1.0}, step=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="number"):
        run.log_metrics({"loss": "high"}, step=1)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="name"):
        run.log_metrics({"loss!": 1.0}, step=1)
    with pytest.raises(ValueError, match="status"):
        run.finish("DONE")
    run.log_metrics({"loss": float("nan")}, step=1)  # a diverged run is data, not an error
    run.finish()


def test_contract_failed_run_keeps_error(kind: str, tracker: Tracker, tmp_path: Path) -> None:
    run = tracker.start_run(run_dir=tmp_path / "r", name="boom", params={"a": 1}, tags={})
    run.log_metrics({"loss": 3.0}, step=10)
    run.finish("FAILED", error="RuntimeError: loss is NaN")
    rec = recorded(kind, tracker, run)
    if rec is not None:
        assert rec.status == "FAILED" and rec.error == "RuntimeError: loss is NaN"


def test_contract_nested_runs(kind: str, tracker: Tracker, tmp_path: Path) -> None:
    trunk = tracker.start_run(run_dir=tmp_path / "trunk", name="trunk", params={}, tags={})
    branch = tracker.start_run(
        run_dir=tmp_path / "trunk" / "decay-1", name="decay-1", params={}, tags={}, parent=trunk
    )
    assert branch.run_id != trunk.run_id
    branch.log_metrics({"loss": 2.0}, step=5)
    trunk.log_metrics({"loss": 2.5}, step=5)  # both open at once in one process
    branch.finish()
    trunk.finish()
    rec = recorded(kind, tracker, branch)
    if rec is not None:
        assert rec.parent == trunk.run_id
        assert rec.metrics["loss"] == [(5, 2.0)]


def test_contract_resume_keeps_run_id(kind: str, tracker: Tracker, tmp_path: Path) -> None:
    if kind == "null":
        pytest.skip("the null tracker keeps nothing to resume")
    run_dir = tmp_path / "r"
    first = tracker.start_run(run_dir=run_dir, name="r", params={"lr": 0.01}, tags={})
    for step in range(10):
        first.log_metrics({"loss": float(step)}, step=step * BIG)
    abandon(first)  # killed: no finish

    again = tracker.start_run(run_dir=run_dir, name="r", params={"lr": 0.01}, tags={"try": "2"})
    assert again.run_id == first.run_id and again.resumed
    # it resumes from a checkpoint taken at step 7: steps 7-9 come again, and are not doubled
    for step in range(7, 20):
        again.log_metrics({"loss": float(step)}, step=step * BIG)
    again.finish()
    rec = recorded(kind, tracker, again)
    assert rec is not None
    assert rec.metrics["loss"] == [(s * BIG, float(s)) for s in range(20)]
    assert rec.status == "FINISHED" and rec.tags["try"] == "2"

    new = tracker.start_run(run_dir=run_dir, name="r", params={}, tags={})
    assert new.run_id != first.run_id and not new.resumed  # a finished run is not reopened
    new.finish()


# ----------------------------------------------------------------------------------------------
# journal and pure helpers (no server)
# ----------------------------------------------------------------------------------------------


def test_flatten_params() -> None:
    flat = flatten_params({"model": {"d": 64, "mup": {"scale_emb": 12.0}}, "betas": (0.9, 0.95)})
    assert flat == {"model.d": "64", "model.mup.scale_emb": "12.0", "betas": "[0.9, 0.95]"}
    assert flatten_params({"a b!": {"c": None}}) == {"a b_.c": "None"}


def test_journal_survives_sigkill_and_torn_line(tmp_path: Path) -> None:
    """A real process killed mid-run: every point it logged is in the journal; a torn last line
    is sealed; the resumed run continues the same run id."""
    run_dir = tmp_path / "r"
    code = (
        "import sys, time\n"
        "from windtunnel.config import TrackerConfig\n"
        "from windtunnel.tracking import open_tracker\n"
        "t = open_tracker(TrackerConfig(kind='jsonl', flush_every=1000))\n"
        f"run = t.start_run(run_dir={str(run_dir)!r}, name='k', params={{}}, tags={{}})\n"
        "for i in range(500): run.log_metrics({'loss': i / 7}, step=i)\n"
        "print(run.run_id, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()  # type: ignore[union-attr]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(run_dir / "journal.jsonl", "ab") as f:
        f.write(b'{"ev":"metrics","t":1,"st')  # a write torn by the kill
    run = open_tracker(TrackerConfig(kind="jsonl")).start_run(
        run_dir=run_dir, name="k", params={}, tags={}
    )
    assert run.run_id == run_id
    run.log_metrics({"loss": -1.0}, step=500)
    run.finish()
    rec = _from_journal(run)
    assert [s for s, _ in rec.metrics["loss"]] == list(range(501))
    assert rec.status == "FINISHED"


def test_replay_skips_a_journal_whose_writer_is_alive(tmp_path: Path) -> None:
    """The journal's life-long lock: replay leaves a journal alone while a live run (in another
    process, or in this one) holds it, and takes it once the writer finished or was SIGKILLed."""
    from windtunnel.files import LockHeld, acquire
    from windtunnel.tracking.replay import ReplayResult, _replay_one

    run_dir = tmp_path / "r"
    code = (
        "import time\n"
        "from windtunnel.config import TrackerConfig\n"
        "from windtunnel.tracking import open_tracker\n"
        "t = open_tracker(TrackerConfig(kind='jsonl'))\n"
        f"run = t.start_run(run_dir={str(run_dir)!r}, name='k', params={{}}, tags={{}})\n"
        "print(run.run_id, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip()
        journal = run_dir / "journal.jsonl"
        result = ReplayResult()
        _replay_one(journal, None, result)  # type: ignore[arg-type]  # skipped before any use
        assert result.skipped_live == [str(journal)]
        with pytest.raises(LockHeld):
            acquire(run_dir / "journal.lock", blocking=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    acquire(run_dir / "journal.lock", blocking=False).release()  # freed by the kernel
    run = open_tracker(TrackerConfig(kind="jsonl")).start_run(
        run_dir=run_dir, name="k", params={}, tags={}
    )
    result = ReplayResult()
    _replay_one(run.journal_path, None, result)  # type: ignore[arg-type]
    assert result.skipped_live == [str(run.journal_path)]  # a live run of this process too
    run.finish()
    acquire(run_dir / "journal.lock", blocking=False).release()


def test_import_does_not_load_mlflow() -> None:
    code = "import sys, windtunnel.tracking; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_open_tracker_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"tracker\.kind"):
        open_tracker(TrackerConfig(kind="wandb"))


# ----------------------------------------------------------------------------------------------
# MLflow specifics against the real server
# ----------------------------------------------------------------------------------------------


def _offline_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum("unreachable" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_server_absent_from_start_then_replay_exactly_once(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="windtunnel.tracking")
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = open_tracker(mlflow_server.cfg(uri=dead, flush_every=50))
    t0 = time.monotonic()
    run = tracker.start_run(run_dir=tmp_path / "r", name="offline", params={"a": 1}, tags={})
    n = 1200
    for i in range(n):
        run.log_metrics({"loss": 1.0 / (i + 1), "tokens": float(i * BIG)}, step=i * BIG)
    run.flush()
    run.finish()
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f"an absent server cost {elapsed:.1f} s"
    assert run.mlflow_run_id is None and _offline_warnings(caplog) == 1
    assert sum(ev["ev"] == "metrics" for ev, _ in iter_events(run.journal_path)) == n

    first = replay_journal(tmp_path, mlflow_server.uri)
    assert (first.runs_created, first.points_sent) == (1, 2 * n)
    again = replay_journal(tmp_path / "r" / "journal.jsonl", mlflow_server.uri)
    assert (again.runs_created, again.points_sent) == (0, 0)
    from windtunnel.tracking.backend import SyncState

    mid = SyncState.load(run.journal_path, mlflow_server.uri).runs[run.run_id]
    rec = _from_mlflow(mlflow_server.uri, mid)
    assert rec.metrics["loss"] == [(i * BIG, 1.0 / (i + 1)) for i in range(n)]
    assert rec.status == "FINISHED" and rec.params == {"a": "1"}
    assert rec.tags["wt.run_id"] == run.run_id


@pytest.mark.integration
def test_server_goes_away_mid_run_and_comes_back(
    mlflow_server: MlflowServer,
    mlflow_proxy: TcpProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="windtunnel.tracking")
    tracker = open_tracker(mlflow_server.cfg(uri=mlflow_proxy.uri, flush_every=10))
    run = tracker.start_run(run_dir=tmp_path / "r", name="flaky", params={}, tags={})
    assert run.mlflow_run_id == run.run_id  # online at start: MLflow's own id
    for i in range(100):
        run.log_metrics({"loss": float(i)}, step=i)
    # sent in the background, without a flush
    deadline = time.monotonic() + 20
    while len(history(mlflow_server.uri, run.run_id)) < 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(history(mlflow_server.uri, run.run_id)) == 100

    mlflow_proxy.down()
    t0 = time.monotonic()
    for i in range(100, 300):
        run.log_metrics({"loss": float(i)}, step=i)
    run.flush()  # tries again, fails, does not raise
    assert time.monotonic() - t0 < 5
    assert _offline_warnings(caplog) == 1
    assert len(history(mlflow_server.uri, run.run_id)) < 300

    mlflow_proxy.up()
    run.flush()  # back: the backlog goes from the journal
    for i in range(300, 350):
        run.log_metrics({"loss": float(i)}, step=i)
    run.finish()
    assert history(mlflow_server.uri, run.run_id) == [(i, float(i)) for i in range(350)]

    assert replay_journal(tmp_path, mlflow_proxy.uri).points_sent == 0
    # Another URI for the same server has no delivery record: the run is found by its
    # wt.run_id tag (no second run) and the resent points are exact duplicates the store drops.
    other = replay_journal(tmp_path, mlflow_server.uri)
    assert other.runs_created == 0
    assert history(mlflow_server.uri, run.run_id) == [(i, float(i)) for i in range(350)]


@pytest.mark.integration
def test_child_of_offline_parent_is_nested_on_replay(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = open_tracker(mlflow_server.cfg(uri=dead))
    trunk = tracker.start_run(run_dir=tmp_path / "trunk", name="trunk", params={}, tags={})
    branch = tracker.start_run(
        run_dir=tmp_path / "trunk" / "b1", name="b1", params={}, tags={}, parent=trunk
    )
    branch.log_metrics({"loss": 1.0}, step=1)
    branch.finish()
    trunk.finish()
    result = replay_journal(tmp_path / "trunk" / "b1", mlflow_server.uri)  # child first
    assert result.runs_created == 2  # the parent was created on the way
    from windtunnel.tracking.backend import SyncState

    parent_mid = SyncState.load(trunk.journal_path, mlflow_server.uri).runs[trunk.run_id]
    child_mid = SyncState.load(branch.journal_path, mlflow_server.uri).runs[branch.run_id]
    assert _from_mlflow(mlflow_server.uri, child_mid).parent == parent_mid
    assert replay_journal(tmp_path, mlflow_server.uri).runs_created == 0


@pytest.mark.integration
def test_replay_to_absent_server_raises_fast(tmp_path: Path) -> None:
    run = open_tracker(TrackerConfig(kind="jsonl")).start_run(
        run_dir=tmp_path / "r", name="j", params={}, tags={}
    )
    run.finish()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        replay_journal(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < 3


@pytest.mark.integration
def test_log_batch_timing_and_ui_url(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    tracker = open_tracker(mlflow_server.cfg(flush_every=1000))
    run = tracker.start_run(run_dir=tmp_path / "r", name="timing", params={}, tags={})
    for i in range(999):
        run.log_metrics({"loss": float(i)}, step=i)
    t0 = time.monotonic()
    run.log_metrics({"loss": 999.0}, step=999)  # the 1000th point: one log_batch
    took = time.monotonic() - t0
    run.finish()
    print(f"log_batch of 1000 points: {took * 1000:.0f} ms")
    assert len(history(mlflow_server.uri, run.run_id)) == 1000
    assert run.experiment_id is not None
    url = mlflow_ui_url(tracker.tracking_uri, run.experiment_id, run.run_id)
    assert url.endswith(f"/runs/{run.run_id}/model-metrics")


TRIAL_PROCESS = """
import json, math, sys
from pathlib import Path
from windtunnel.tracking import open_tracker
from windtunnel.config import TrackerConfig

cfg = TrackerConfig(kind="mlflow", uri=sys.argv[1], experiment="rest", flush_every=2)
run = open_tracker(cfg).start_run(
    run_dir=Path(sys.argv[2]), name="no-mlflow", params={"lr": 0.01}, tags={"wt.kind": "run"}
)
for i, v in enumerate([3.0, math.nan, math.inf, 2.5]):
    run.log_metrics({"loss": v}, step=10**10 + i)
run.log_dict({"lr": 0.01}, "config.json")
run.finish()
print(json.dumps({"run_id": run.mlflow_run_id, "mlflow_imported": "mlflow" in sys.modules}))
"""


@pytest.mark.integration
def test_trial_process_logs_without_importing_mlflow(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """A trial talks to MLflow's REST API itself: importing mlflow would cost it 1–2 s of CPU.
    Everything must still arrive: params, non-finite points (a diverging trial), the config."""
    out = subprocess.run(
        [sys.executable, "-c", TRIAL_PROCESS, mlflow_server.uri, str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["mlflow_imported"] is False
    rec = _from_mlflow(mlflow_server.uri, got["run_id"])
    assert rec.params == {"lr": "0.01"} and rec.status == "FINISHED"
    steps = [s for s, _ in rec.metrics["loss"]]
    values = [v for _, v in rec.metrics["loss"]]
    assert steps == [10**10 + i for i in range(4)]
    assert values[0] == 3.0 and math.isnan(values[1])
    assert values[2] >= 1.79e308  # MLflow's SQL store keeps +inf as the largest double
    assert values[3] == 2.5
    assert rec.artifacts == {"config.json"}
    from mlflow import MlflowClient

    config = MlflowClient(mlflow_server.uri).download_artifacts(got["run_id"], "config.json")
    assert json.loads(Path(config).read_text()) == {"lr": 0.01}
