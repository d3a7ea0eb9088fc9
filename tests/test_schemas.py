"""Every file windtunnel reads has a schema with a version (windtunnel/schema.py).

Property-based: files written by windtunnel's own writers are mutated (a field removed, retyped,
the version changed) and read back. A reader either reads the file, and what reads it next does
not crash, or refuses it with one :class:`SchemaError` line naming the file and the field.
"""

from __future__ import annotations

import copy
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from windtunnel.schema import SchemaError, field_name

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BAD = [True, {"x": [1]}, [[None]]]
"""Replacement values wrong for every typed field (strict: ``True`` is not a number or text)."""


def leaves(data: Any, skip: tuple[str, ...] = (), prefix: tuple[Any, ...] = ()) -> list[tuple]:
    """Paths to every value in ``data`` (lists: first and last item), outside ``skip``."""
    out: list[tuple] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if prefix or k not in skip:
                out.append((*prefix, k))
                out += leaves(v, skip, (*prefix, k))
    elif isinstance(data, list) and data:
        for i in sorted({0, len(data) - 1}):
            out.append((*prefix, i))
            out += leaves(data[i], skip, (*prefix, i))
    return out


def _inner(tp: Any) -> Any:
    """``X`` of ``X | None`` and of ``Annotated[X, ...]``."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def expected(model: type[BaseModel], path: tuple, how: str, value: Any = None) -> bool:
    """Whether ``how`` (delete, retype to ``value``) at ``path`` must be refused by ``model``:
    a retyped field the model types, or a required field deleted."""
    tp: Any = model
    for i, part in enumerate(path):
        tp = _inner(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if part not in tp.model_fields:
                return False  # a field the reader does not name: kept as it is
            if how == "delete" and i == len(path) - 1:
                return tp.model_fields[part].is_required()
            tp = tp.model_fields[part].annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return False
        if tp is Any:
            return False
    if how == "delete":
        return False  # an entry of a list or a mapping, not a field
    tp = _inner(tp)
    if typing.get_origin(tp) is dict and typing.get_args(tp)[-1] is Any:
        return not isinstance(value, dict)  # any object is one
    if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(value, dict):
        return any(f.is_required() for f in tp.model_fields.values())  # else {"x": 1} is one
    return True


def mutate(data: Any, path: tuple, how: str, value: Any = None) -> Any:
    out = copy.deepcopy(data)
    node = out
    for part in path[:-1]:
        node = node[part]
    if how == "delete":
        if isinstance(node, list):
            return None  # deleting a list item is not a field change
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def read_mutated(
    data: st.DataObject, base: Any, model: type[BaseModel], path: Path, read: Any
) -> tuple[Any, SchemaError | None]:
    """Draw one mutation of ``base`` (a field removed or retyped), write it to ``path`` and
    ``read()`` it: refused, in one line naming the field; or read, where ``model`` does not
    require a refusal. Returns what was read (``None`` if refused) and the refusal."""
    mutated = data.draw(st.sampled_from(leaves(base)))
    how = data.draw(st.sampled_from(["delete", "retype"]))
    value = data.draw(st.sampled_from(BAD))
    bad = mutate(base, mutated, how, value)
    path.write_text(json.dumps(base if bad is None else bad))
    try:
        out = read()
    except SchemaError as e:
        assert_one_line_naming(e, path, mutated)
        return None, e
    if bad is not None:
        assert not expected(model, mutated, how, value), f"{how} {field_name(mutated)} was read"
    return out, None


def assert_one_line_naming(err: SchemaError, path: Path, mutated: tuple) -> None:
    """The message is one line starting with the file's path and naming the mutated field, the
    object that lacks it, or the part of the new value that is wrong."""
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: field {err.field}: ")
    assert related(field_name(mutated), err.field), (mutated, msg)


def related(a: str, b: str) -> bool:
    """One field holds the other (or they are the same)."""
    a, b = sorted((a, b), key=len)
    return a == b or a == "(the whole file)" or b.startswith((a + ".", a + "["))


# -- fit files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fit_file() -> dict[str, Any]:
    from windtunnel.scaling.analyze import analyze
    from windtunnel.scaling.laws import DataModelLaw

    law = DataModelLaw(E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.28)
    N = np.repeat([1e5, 3e5, 1e6, 3e6], 3)
    D = N * np.tile([10.0, 20.0, 40.0], 4)
    rng = np.random.default_rng(0)
    loss = law.predict(N, D) * np.exp(rng.normal(0, 0.005, N.size))
    data, *_ = analyze(pd.DataFrame({"N": N, "D": D, "loss": loss}), n_boot=20, backtest_boot=0)
    data["batch_size_law"] = {"k": 1.2e9, "gamma": 6.2, "loss_range": [2.0, 3.0]}
    return data


def _plan_or_refuse(tmp_path: Path, data: Any, mutated: tuple) -> None:
    from windtunnel.scaling.errors import ScalingError
    from windtunnel.scaling.plan import load_fit_file, make_plan

    path = tmp_path / "fit.json"
    path.write_text(json.dumps(data))
    try:
        fit = load_fit_file(path)
    except SchemaError as e:
        assert_one_line_naming(e, path, mutated)
        raise
    try:
        make_plan(fit, budget_flops=1e21)
    except ScalingError as e:  # a refused plan is a user error too, never a crash
        assert "\n" not in str(e)


def test_the_writer_output_reads_back(tmp_path: Path, fit_file: dict[str, Any]) -> None:
    from windtunnel.scaling.analyze import FIT_FILE_VERSION

    assert fit_file["version"] == FIT_FILE_VERSION == 2
    _plan_or_refuse(tmp_path, fit_file, ())


@SETTINGS
@given(data=st.data())
def test_mutated_fit_files_are_read_or_refused_by_field(
    tmp_path: Path, fit_file: dict[str, Any], data: st.DataObject
) -> None:
    """Removing or retyping any field the planner reads: a plan, or one line naming it."""
    from windtunnel.scaling.analyze import FIT_FILE_MODELS

    paths = leaves(fit_file, skip=("diagnostics",))
    mutated = data.draw(st.sampled_from(paths))
    how = data.draw(st.sampled_from(["delete", "retype"]))
    value = data.draw(st.sampled_from(BAD))
    bad = mutate(fit_file, mutated, how, value)
    if bad is None:
        return
    must_refuse = expected(FIT_FILE_MODELS[2], mutated, how, value) and mutated != ("version",)
    try:
        _plan_or_refuse(tmp_path, bad, mutated)
    except SchemaError:
        return
    assert not must_refuse, f"{how} {field_name(mutated)} was read"


@SETTINGS
@given(version=st.one_of(st.integers(), st.text(max_size=3), st.floats(), st.none()))
def test_fit_file_versions(tmp_path: Path, fit_file: dict[str, Any], version: Any) -> None:
    """Versions 1 and 2 are read (1 without its ranges), any other is refused naming it."""
    bad = {**fit_file, "version": version}
    if version in (1, 2) and type(version) is int:
        _plan_or_refuse(tmp_path, bad, ("version",))
        return
    with pytest.raises(SchemaError) as e:
        _plan_or_refuse(tmp_path, bad, ("version",))
    assert e.value.field == "version"
    if type(version) is int:
        assert "this windtunnel reads versions 1, 2" in str(e.value)
        assert "refit with `windtunnel fit" in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("alpha", -0.3, "greater than 0"),
        ("beta", 0.0, "greater than 0"),
        ("E", -1.0, "greater than or equal to 0"),
        ("A", float("inf"), "finite number"),
    ],
)
def test_a_law_without_its_terms_is_refused(
    tmp_path: Path, fit_file: dict, field: str, value: float, problem: str
) -> None:
    """A hand-edited law with a negative exponent or E has no allocation: refused by field,
    before the planner divides by it."""
    bad = {**fit_file, "fit": {**fit_file["fit"], field: value}}
    with pytest.raises(SchemaError, match=rf"field fit.{field}: input should be .*{problem}"):
        _plan_or_refuse(tmp_path, bad, ("fit", field))


def test_version_1_fit_file_without_ranges_is_read(tmp_path: Path, fit_file: dict) -> None:
    old = {k: v for k, v in fit_file.items() if k != "data_range"}
    old["version"] = 1
    _plan_or_refuse(tmp_path, old, ())
    with pytest.raises(SchemaError, match=r"field data_range: missing \(a version-2 fit file"):
        _plan_or_refuse(tmp_path, {**old, "version": 2}, ("data_range",))


def test_cli_refuses_a_bad_fit_file_in_one_line(
    tmp_path: Path, fit_file: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from windtunnel.cli import main

    path = tmp_path / "fit.json"
    path.write_text(json.dumps(mutate(fit_file, ("fit", "alpha"), "retype", "0.3")))
    assert main(["plan", "--fit", str(path), "--budget-flops", "1e21"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"{path}: field fit.alpha: input should be a valid number, got '0.3'" in err


# -- tunnel state -------------------------------------------------------------------------------


STATE = {
    "version": 1,
    "tunnel": {"name": "t"},
    "report": {"html": "/x/report.html"},
    "stages": {
        "ladder": {"status": "failed", "key": "k1", "error": "RuntimeError: boom"},
        "fit": {"status": "running", "key": "k2"},
        "plan": {"status": "skipped"},
    },
}


@SETTINGS
@given(data=st.data())
def test_mutated_tunnel_states_are_read_or_refused_by_field(
    tmp_path: Path, data: st.DataObject
) -> None:
    from windtunnel.tunnel.runner import StateFile, load_state, summarize

    path = tmp_path / "state.json"
    state, refused = read_mutated(data, STATE, StateFile, path, lambda: load_state(path))
    if refused:
        assert "delete" in str(refused) and "or use a new tunnel.name" in str(refused)
    else:
        summarize(state, tmp_path)


def test_tunnel_state_versions(tmp_path: Path) -> None:
    from windtunnel.tunnel.runner import load_state

    path = tmp_path / "state.json"
    path.write_text(json.dumps({k: v for k, v in STATE.items() if k != "version"}))
    assert load_state(path)["version"] == 1  # written before states had a version
    path.write_text(json.dumps({**STATE, "version": 2}))
    with pytest.raises(SchemaError, match=r"field version: a version-2 tunnel state; this"):
        load_state(path)


# -- the run folder's files ---------------------------------------------------------------------


def _result() -> Any:
    from windtunnel.run_files import PointResult, TrainResult

    point = PointResult(
        tokens=1000, N=10, D=1000, flops=6e4, val_loss=3.0, val_bpb=1.2,
        domains={"en": {"val_loss": 3.0}}, run_id="b1",
    )  # fmt: skip
    return TrainResult(
        status="finished", run_id="r1", tracking_uri="", run_dir="/runs/r", N=10, tokens=1000,
        flops=6e4, initial_val_loss=math.nan, val_loss=3.0, val_bpb=1.2, points=[point],
    )  # fmt: skip


def test_run_folder_files_round_trip(tmp_path: Path) -> None:
    from windtunnel import run_files as train

    result = _result()
    path = tmp_path / "result.json"
    train._json_write(path, train._versioned(result.to_json()))
    back = train._result_from_json(train._read_run_file(path, train._Result))
    assert back.points == result.points and back.val_loss == result.val_loss
    old = result.to_json()  # written before run files had a version
    path.write_text(json.dumps(old))
    assert train._result_from_json(train._read_run_file(path, train._Result)).run_id == "r1"
    path.write_text(json.dumps({**old, "version": 9}))
    with pytest.raises(SchemaError, match=r"result.json: field version: a version-9 run folder"):
        train._read_run_file(path, train._Result)


@SETTINGS
@given(data=st.data())
def test_mutated_run_results_are_read_or_refused_by_field(
    tmp_path: Path, data: st.DataObject
) -> None:
    from windtunnel import run_files as train

    saved = json.loads(json.dumps(train._versioned(_result().to_json())))
    path = tmp_path / "result.json"
    back, refused = read_mutated(
        data, saved, train._Result, path,
        lambda: train._result_from_json(train._read_run_file(path, train._Result)),
    )  # fmt: skip
    assert "resume=false" in str(refused) if refused else back.run_id == "r1"


@pytest.mark.parametrize(
    "name, good",
    [("logged", {"train": 5, "eval": -1}), ("initial_eval", {"val_loss": 4.2, "val_bpb": 2.0})],
)
def test_small_run_files(tmp_path: Path, name: str, good: dict) -> None:
    from windtunnel import run_files as train

    model = {"logged": train._Logged, "initial_eval": train._InitialEval}[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(good))
    assert train._read_run_file(path, model) == good
    key = next(iter(good))
    path.write_text(json.dumps({**good, key: "5"}))
    with pytest.raises(SchemaError, match=rf"{name}.json: field {key}: input should be"):
        train._read_run_file(path, model)


# -- checkpoint and corpus metadata ------------------------------------------------------------


CKPT_META = {
    "format": 2, "step": 10, "guard": [3.0, math.inf], "model_shape": {"d_model": 32},
    "world_size": 1, "parallel": "none",
}  # fmt: skip


@SETTINGS
@given(data=st.data())
def test_checkpoint_meta(tmp_path: Path, data: st.DataObject) -> None:
    from windtunnel.checkpoint import CheckpointError, CheckpointMeta, read_meta

    path = tmp_path / "meta.json"
    meta, refused = read_mutated(data, CKPT_META, CheckpointMeta, path, lambda: read_meta(tmp_path))
    assert isinstance(refused, CheckpointError) if refused else meta["step"] == 10


def test_checkpoint_formats(tmp_path: Path) -> None:
    from windtunnel.checkpoint import read_meta

    (tmp_path / "meta.json").write_text(json.dumps({**CKPT_META, "format": 3}))
    with pytest.raises(SchemaError, match=r"field format: a version-3 checkpoint; this windtunn"):
        read_meta(tmp_path)


CORPUS_META = {
    "format": "windtunnel-corpus", "format_version": 1, "name": "c", "vocab_size": 256,
    "dtype": "uint16", "eot_id": None, "tokenizer": "tokenizer.json",
    "domains": [{"name": "en", "kind": "text", "weight": 1.0,
                 "train": {"path": "en.train.bin", "tokens": 100, "bytes": 400},
                 "val": {"path": "en.val.bin", "tokens": 10, "bytes": 40}}],
}  # fmt: skip


@SETTINGS
@given(data=st.data())
def test_corpus_meta(tmp_path: Path, data: st.DataObject) -> None:
    from windtunnel.data import DataError, PreparedCorpus
    from windtunnel.data.corpus import CorpusMeta

    path = tmp_path / "meta.json"
    corpus, refused = read_mutated(
        data, CORPUS_META, CorpusMeta, path, lambda: PreparedCorpus.load(tmp_path)
    )
    if refused:
        assert isinstance(refused, DataError) and "prepare it again" in str(refused)
    else:
        assert corpus.domains[0].train_tokens == 100


def test_corpus_without_a_format_version_is_refused(tmp_path: Path) -> None:
    from windtunnel.data import PreparedCorpus

    old = {k: v for k, v in CORPUS_META.items() if k != "format_version"}
    (tmp_path / "meta.json").write_text(json.dumps(old))
    with pytest.raises(SchemaError, match=r"field format_version: missing .*prepare it again"):
        PreparedCorpus.load(tmp_path)


# -- journals and their delivery record ---------------------------------------------------------


EVENTS = [
    {"ev": "start", "t": 1, "run_id": "r1", "name": "n", "params": {"a": "1"}, "tags": {}},
    {"ev": "metrics", "t": 2, "step": 0, "values": {"loss": 3.0}},
    {"ev": "tags", "t": 3, "tags": {"k": "v"}},
    {"ev": "dict", "t": 4, "file": "config.json", "obj": {"a": [1]}},
    {"ev": "finish", "t": 5, "status": "FINISHED", "error": None},
]


def _journal(path: Path, events: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)
    return path


@SETTINGS
@given(data=st.data())
def test_mutated_journal_events(tmp_path: Path, data: st.DataObject) -> None:
    from windtunnel.tracking import journal as j
    from windtunnel.tracking.journal import iter_events

    MODELS = (j.StartEvent, j.MetricsEvent, j.TagsEvent, j.DictEvent, j.FinishEvent)
    i = data.draw(st.integers(0, len(EVENTS) - 1))
    mutated = data.draw(st.sampled_from(leaves(EVENTS[i])))
    how = data.draw(st.sampled_from(["delete", "retype"]))
    value = data.draw(st.sampled_from(BAD))
    event = mutate(EVENTS[i], mutated, how, value)
    if event is None or mutated == ("dict", "obj") or mutated[0] == "obj":
        return  # a dict event's object is any JSON
    path = _journal(tmp_path / "journal.jsonl", [*EVENTS[:i], event, *EVENTS[i + 1 :]])
    try:
        got = [e for e, _ in iter_events(path)]
    except SchemaError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path} (line at byte ")
        assert related(field_name(mutated), e.field) or e.field == "ev", (mutated, str(e))
        return
    if mutated == ("ev",) and how == "delete":
        assert len(got) == len(EVENTS) - 1  # a line without "ev" is not an event (as before)
        return
    model = {m.model_fields["ev"].annotation.__args__[0]: m for m in MODELS}[EVENTS[i]["ev"]]
    assert not expected(model, mutated, how, value), f"{how} {field_name(mutated)} was read"


def test_journal_tolerates_a_torn_line_and_refuses_versions(tmp_path: Path) -> None:
    from windtunnel.tracking.journal import iter_events, read_state

    path = _journal(tmp_path / "journal.jsonl", EVENTS, tail='{"ev":"metrics","t":1,"st')
    assert len(list(iter_events(path))) == len(EVENTS)  # the torn last line: not yet an event
    assert read_state(path).finish is not None
    start = {**EVENTS[0], "version": 2}
    _journal(path, [start, *EVENTS[1:]])
    with pytest.raises(SchemaError, match=r"field version: a version-2 journal; this windtunnel"):
        list(iter_events(path))


def test_sync_record_versions(tmp_path: Path) -> None:
    from windtunnel.tracking.backend import SYNCED_NAME, SyncState

    journal = tmp_path / "journal.jsonl"
    record = tmp_path / SYNCED_NAME
    target = {"offset": 120, "current": "r1", "runs": {"r1": "m1"}, "experiment_ids": {}}
    record.write_text(json.dumps({"targets": {"http://x": target}}))  # before it had a version
    assert SyncState.load(journal, "http://x").offset == 120
    record.write_text(json.dumps({"version": 2, "targets": {}}))
    with pytest.raises(SchemaError, match=r"journal.synced: field version: a version-2"):
        SyncState.load(journal, "http://x")
    record.write_text(json.dumps({"targets": {"http://x": {**target, "offset": "120"}}}))
    with pytest.raises(SchemaError, match=r"field targets.http://x.offset: input should be"):
        SyncState.load(journal, "http://x")


# -- sweep and tunnel specs ---------------------------------------------------------------------


SPEC = """defaults:
  - sweep_schema
  - launcher: local
  - _self_
{version}
sweep:
  name: s
  n_trials: {n_trials}
  space:
    lr: {{key: optim.lr, kind: float, low: 0.001, high: 0.1, log: true}}
"""


@pytest.mark.parametrize(
    "version, n_trials, match",
    [
        ("", 4, None),
        ("version: 1", 4, None),
        ("version: 2", 4, r"s.yaml: field version: a version-2 sweep spec; this windtunnel reads"),
        ("", "many", r"s.yaml: bad sweep spec or override: .*n_trials"),
        ("colour: red", 4, r"s.yaml: bad sweep spec or override: .*colour"),
    ],
)
def test_sweep_spec_versions_and_keys(tmp_path: Path, version: str, n_trials: Any, match: Any):
    from windtunnel.sweep.spec import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text(SPEC.format(version=version, n_trials=n_trials))
    if match is None:
        assert load_sweep(path).version == 1
        return
    with pytest.raises(ValueError, match=match) as e:
        load_sweep(path)
    assert "\n" not in str(e.value)


# -- a planned experiment (`windtunnel plan --out`), read by `windtunnel export` ---------------


def test_planned_experiment_model_section_is_checked_by_key(tmp_path: Path) -> None:
    import yaml

    from windtunnel.export import ExportError, model_config_of

    plan = {"stage": "full", "model": {"name": "p", "n_layers": 4, "d_model": 64}}
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert model_config_of(path).d_model == 64
    for key, value, match in [
        ("d_model", "wide", "model.d_model='wide'"),
        ("colour", 1, "model.colour"),
    ]:
        path.write_text(yaml.safe_dump({**plan, "model": {**plan["model"], key: value}}))
        with pytest.raises(ExportError, match=rf"^{path}: .*{match}") as e:
            model_config_of(path)
        assert "\n" not in str(e.value)
