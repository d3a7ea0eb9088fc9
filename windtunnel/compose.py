"""The one place where Hydra composes configs: runs, sweep specs and tunnel specs.

Everything above this module (the CLI, sweeps, tunnels) asks it for typed dataclasses; everything
below it (the trainer, workers, the fitter) never imports Hydra. Three entry points:

* :func:`compose_run` — ``conf/config.yaml`` plus overrides (``model=micro_m optim.lr=3e-3``)
  → :class:`~windtunnel.config.RunConfig`, the same path as ``windtunnel train``;
* :func:`compose_spec` — a spec YAML (``sweeps/<name>.yaml``, ``tunnels/<name>.yaml``) whose
  defaults may pick ``conf/`` groups (``launcher: local``), plus overrides → its schema's
  dataclass;
* :func:`find_spec` — a spec by name (``ladder``) or path.

Composed configs become dataclasses through :func:`windtunnel.config.from_dict`, the one
conversion used everywhere (also for configs read back from JSON).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from windtunnel.config import RunConfig, from_dict

if TYPE_CHECKING:
    from windtunnel.launch.options import LauncherOptions

T = TypeVar("T")

SPEC_VERSION = 1
"""Version of the sweep and tunnel spec layouts (their optional ``version`` key; absent: 1).
Unknown keys and mistyped values are refused by Hydra's structured configs and ``from_dict``."""

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"
"""``conf/`` of the checkout this package was installed from (``pip install -e .``)."""


def conf_dir() -> Path:
    """The folder of Hydra config groups: ``$WINDTUNNEL_CONF`` or the checkout's ``conf/``."""
    path = Path(os.environ.get("WINDTUNNEL_CONF", REPO_CONF))
    if not (path / "config.yaml").exists():
        raise ValueError(
            f"no config.yaml under {path}: run from a windtunnel checkout (pip install -e .) "
            "or set WINDTUNNEL_CONF to a folder holding the conf/ groups"
        )
    return path


def config_groups() -> dict[str, list[str]]:
    """Group → options, read from the conf folder (cheap: no Hydra import)."""
    try:
        root = conf_dir()
    except ValueError:
        return {}
    return {
        g.name: sorted(p.stem for p in g.glob("*.yaml"))
        for g in sorted(root.iterdir())
        if g.is_dir()
    }


def _register(name: str, schema: type) -> None:
    """Store ``schema`` as Hydra's schema ``name``. Its fields typed ``Any`` (a spec's
    ``launcher``) stay open dicts: any key composes, and the dataclass checks them itself."""
    import dataclasses
    import typing

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if hints[f.name] is Any:
            OmegaConf.set_struct(node[f.name], False)
    ConfigStore.instance().store(name=name, node=node)


def _register_run_schemas() -> None:
    import dataclasses

    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(f.default_factory):
            cs.store(group=f.name, name=f"{f.name}_schema", node=f.default_factory)


def _hydra_errors() -> tuple[type[Exception], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException)


def hydra_message(e: BaseException, schema: type | None = None) -> str:
    """Hydra's error, naming the override and what it allows: the cause's first line (the
    value's type, the missing key) rather than "Error merging override", the keys of the section
    for an unknown key, no search path, no "+key" advice (the schema refuses new keys)."""
    import dataclasses
    import re

    cause = e.__cause__
    key = re.search(r"full_key: (\S+)", str(cause)) if cause is not None else None
    if cause is not None and key is not None:
        first = str(cause).splitlines()[0]
        missing = re.match(r"Key '([^']+)' not in '([^']+)'", first)
        if missing is None:
            return f"{key.group(1)}: {first}"
        section: Any = schema
        for part in key.group(1).split(".")[:-1]:  # the dataclass of the key's section
            f = {f.name: f for f in dataclasses.fields(section)}.get(part) if section else None
            factory = f.default_factory if f else None
            section = factory if dataclasses.is_dataclass(factory) else None
        valid = sorted(f.name for f in dataclasses.fields(section)) if section else []
        where = key.group(1).rpartition(".")[0] or "the config"
        keys = f"; the keys of {where}: {', '.join(valid)}" if valid else ""
        return f"{key.group(1)} is not a setting (no key {missing.group(1)!r} in {where}){keys}"
    text = str(e).split("Config search path:")[0]  # lines kept: the CLI makes them one
    return "\n".join(x for x in text.rstrip().splitlines() if not x.strip().endswith("_schema"))


def compose_run(overrides: Sequence[str] = ()) -> RunConfig:
    """Hydra overrides → :class:`RunConfig` (``ValueError`` with Hydra's message)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    _register_run_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose("config", overrides=list(overrides))
        data = OmegaConf.to_container(cfg, resolve=True)
    except _hydra_errors() as e:
        raise ValueError(f"bad config or override: {hydra_message(e, RunConfig)}") from None
    assert isinstance(data, dict)
    return from_dict(RunConfig, {str(k): v for k, v in data.items() if k != "hydra"})


def compose_spec(
    path: Path, schema: type[T], overrides: Sequence[str], *, schema_name: str, what: str
) -> T:
    """A spec file (with ``conf/`` on Hydra's search path) plus overrides → ``schema``.

    The spec's ``defaults`` name ``schema_name`` (registered here) and may pick ``conf/`` groups
    such as ``launcher: slurm``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    _register(schema_name, schema)
    GlobalHydra.instance().clear()
    search = f"hydra.searchpath=[file://{conf_dir()}]"
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None):
            cfg = compose(path.stem, overrides=[search, *overrides])
        data = OmegaConf.to_container(cfg, resolve=True)
    except _hydra_errors() as e:
        message = f"{path}: bad {what} or override: {hydra_message(e, schema)}"
        raise ValueError(" ".join(message.split())) from None  # one line
    assert isinstance(data, dict)
    spec = from_dict(schema, {str(k): v for k, v in data.items() if k != "hydra"})
    version = getattr(spec, "version", SPEC_VERSION)
    if version != SPEC_VERSION:
        from windtunnel.schema import SchemaError

        raise SchemaError(
            path,
            "version",
            f"a version-{version} {what}; this windtunnel reads version {SPEC_VERSION}",
            "use the windtunnel that wrote it, or update the spec to this one's keys",
        )
    return spec


def find_spec(path: str | Path, folder: str) -> Path:
    """``path`` itself, or ``<folder>/<path>.yaml`` here or in the checkout for a bare name."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = conf_dir().parent / folder
    for root in (Path(folder), shipped):  # here, then the checkout's
        if (root / f"{p}.yaml").is_file():
            return root / f"{p}.yaml"
    ready = sorted(x.stem for x in shipped.glob("*.yaml"))
    raise ValueError(f"no spec at {p}; the ready ones in {folder}/: {', '.join(ready)}")


def split_overrides(
    overrides: Sequence[str] | None, own: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """``(overrides of the spec itself, the rest)``: a spec's own top-level keys are ``own``."""
    mine = [o for o in overrides or [] if o.lstrip("+~").split("=")[0].split(".")[0] in own]
    return mine, [o for o in overrides or [] if o not in mine]


def compose_launcher(overrides: Sequence[str]) -> LauncherOptions:
    """``launcher=NAME`` and ``launcher.KEY=VALUE`` overrides → that backend's typed options
    (``conf/launcher/NAME.yaml`` with the keys set on top; ``local`` when no name is given)."""
    from omegaconf import OmegaConf

    from windtunnel.launch.options import launcher_options

    name, keys = "local", []
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == "launcher":
            name = value
        elif key.startswith("launcher."):
            keys.append(f"{key[len('launcher.') :]}={value}")
        else:
            raise ValueError(f"{o!r}: give launcher=NAME or launcher.KEY=VALUE")
    path = conf_dir() / "launcher" / f"{name}.yaml"
    if not path.is_file():
        ready = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"launcher={name}: choose one of {', '.join(ready)}")
    try:
        node = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(keys))
        data = OmegaConf.to_container(node, resolve=True)
    except _hydra_errors() as e:
        raise ValueError(f"bad launcher override in {list(overrides)}: {e}") from None
    assert isinstance(data, dict)
    return launcher_options({str(k): v for k, v in data.items()})


def parse_dotlist(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` → ``{"a": {"b": 1}, "c": ["x", "y"]}`` (Hydra's value grammar)."""
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except _hydra_errors() as e:
        raise ValueError(f"bad override in {list(overrides)}: {e}") from None
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def as_override(key: str, value: Any) -> str:
    """A value as a Hydra override (floats keep full precision)."""
    if isinstance(value, float):
        return f"{key}={value!r}"
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").isalnum():
        return f"{key}='{value}'"  # quoted unless a plain name (a config group option)
    if isinstance(value, (list, tuple)):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value}"
