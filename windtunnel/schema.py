"""The files windtunnel reads: one pydantic model per format, one loader, one user error.

Every file windtunnel writes and later reads back (fit files, tunnel state, run folder files,
checkpoint and corpus metadata, journals, the tracking sidecar) has a model next to its reader
and writer, a version, and a list of the versions this windtunnel reads. :func:`load_versioned`
reads a JSON file, checks its version, then its fields against the model; anything wrong is a
:class:`SchemaError`, one line naming the file, the field and what to do (through the CLI: exit
2, no traceback). The models are strict (a number written as ``"3"`` or ``true`` is refused) and
keep fields they do not name (a file may carry more than its reader needs).

Pure: pydantic only, no other windtunnel module.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

M = TypeVar("M", bound=BaseModel)


class SchemaError(ValueError):
    """A file windtunnel reads is not one it can read: its path, the field, what to do."""

    def __init__(self, path: str | Path, field: str, problem: str, fix: str = "") -> None:
        self.path, self.field, self.problem, self.fix = str(path), field, problem, fix
        text = f"{path}: field {field}: {problem}" + (f": {fix}" if fix else "")
        super().__init__(" ".join(text.split()))  # one line, whatever the parts hold


class FileModel(BaseModel):
    """Base of a file format's model: strict types, unnamed fields kept."""

    model_config = ConfigDict(strict=True, extra="allow")


def model_of(
    dc: type, name: str, *, drop: Sequence[str] = (), **fields: tuple[Any, Any]
) -> type[FileModel]:
    """A strict :class:`FileModel` with the fields of the dataclass ``dc`` (its annotations and
    defaults), so a dataclass kept as JSON has one schema; ``drop`` removes fields and
    ``fields`` replace or add some (``name=(type, default)``, default ``...``: required)."""
    hints = typing.get_type_hints(dc)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(dc):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        spec[f.name] = (hints[f.name], default)
    for key in drop:
        spec.pop(key)
    spec.update(fields)
    made: type[FileModel] = create_model(name, __base__=FileModel, **spec)
    return made


def field_name(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the whole file)"


def problem_text(err: Mapping[str, Any]) -> str:
    if err["type"] == "missing":
        return "missing"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{str(err['msg'])[:1].lower()}{str(err['msg'])[1:]}, got {shown}"


def versions_text(versions: Sequence[int]) -> str:
    return (
        f"version {versions[0]}"
        if len(versions) == 1
        else (f"versions {', '.join(map(str, versions))}")
    )


def check_versioned(
    data: Any,
    models: Mapping[int, type[M]],
    *,
    path: str | Path,
    what: str,
    fix: str,
    key: str = "version",
    default: int | None = 1,
    error: type[SchemaError] = SchemaError,
) -> M:
    """``data`` (a parsed file) as the model of its version; :class:`SchemaError` otherwise.

    ``models`` maps each version this windtunnel reads to its model; ``key`` holds the version
    (``default`` for files written before they had one; ``None``: such files are refused);
    ``error`` is the reader's own subclass of :class:`SchemaError`, if it has one."""
    reads = sorted(models)
    if not isinstance(data, Mapping):
        raise error(
            path, "(the whole file)", f"expected a JSON object, got {type(data).__name__}", fix
        )
    version = data.get(key, default)
    if version is None:
        raise error(
            path, key, f"missing (this windtunnel reads {what} {versions_text(reads)})", fix
        )
    if type(version) is not int:
        raise error(path, key, f"expected an integer, got {version!r}", fix)
    if version not in models:
        raise error(
            path, key,
            f"a version-{version} {what}; this windtunnel reads {versions_text(reads)}", fix,
        )  # fmt: skip
    try:
        return models[version].model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise error(
            path,
            field_name(err["loc"]),
            f"{problem_text(err)} (a version-{version} {what}; this windtunnel reads "
            f"{versions_text(reads)})",
            fix,
        ) from None


def read_json(
    path: str | Path, *, what: str, fix: str, error: type[SchemaError] = SchemaError
) -> Any:
    """The parsed JSON of ``path``; a missing or invalid file is a :class:`SchemaError`."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise error(
            path, "(the whole file)", f"cannot read this {what} ({e.strerror})", fix
        ) from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise error(path, "(the whole file)", f"not a {what} (invalid JSON: {e})", fix) from None


def load_versioned(
    path: str | Path,
    models: Mapping[int, type[M]],
    *,
    what: str,
    fix: str,
    key: str = "version",
    default: int | None = 1,
    error: type[SchemaError] = SchemaError,
) -> tuple[M, dict[str, Any]]:
    """Read the JSON file ``path`` and check it (:func:`check_versioned`): its model and the
    parsed dict (for readers that keep working on the dict)."""
    data = read_json(path, what=what, fix=fix, error=error)
    model = check_versioned(
        data, models, path=path, what=what, fix=fix, key=key, default=default, error=error
    )
    return model, data


def written(model: type[BaseModel], data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` as a writer is about to save it, checked against its model first (a writer and
    its reader share one model, so they cannot drift): a mismatch is a bug, not a user error."""
    try:
        model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise AssertionError(
            f"{model.__name__} would be written with {field_name(err['loc'])}: {problem_text(err)}"
        ) from None
    return data
