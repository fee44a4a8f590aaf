"""Every registered component becomes a Hydra config-group option, typed by its signature.

For each registry entry a dataclass is generated from the constructor's parameters and
stored in Hydra's ConfigStore as ``<kind>/<name>``: ``sampler=ddim sampler.steps=20`` works
with no YAML file, a mistyped field or a wrong-typed value fails at compose time naming the
field and the component, and YAML presets in ``conf/`` extend these nodes through their
defaults list. Parameters named in :data:`WIRED` are supplied by the framework from other
components (the data shape, the conditioning width, the number of classes) and are not
config fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional, Union

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from unfog import registry
from unfog.errors import ConfigError

WIRED: frozenset[str] = frozenset({"data_shape", "cond_dim", "context_dim", "cond_channels", "num_classes"})
NAME_KEY = "_name_"


@dataclasses.dataclass(frozen=True)
class Param:
    """One configurable constructor parameter: its name, config type, default and choices."""

    name: str
    type: Any
    default: Any
    choices: tuple[Any, ...] | None = None
    is_tuple: bool = False


def _callable_for(obj: Callable[..., Any]) -> Callable[..., Any]:
    return obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]


def params_of(obj: Callable[..., Any]) -> list[Param]:
    """The configurable parameters of a component constructor, in signature order."""
    fn = _callable_for(obj)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to untyped fields
        hints = {}
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in WIRED or p.name == "self":
            continue
        typ, choices, is_tuple = _config_type(hints.get(p.name, Any))
        default = MISSING if p.default is inspect.Parameter.empty else p.default
        if isinstance(default, tuple):
            default = list(default)
        out.append(Param(p.name, typ, default, choices, is_tuple))
    return out


def _config_type(hint: Any) -> tuple[Any, tuple[Any, ...] | None, bool]:
    """Map a Python annotation to an OmegaConf-supported type, plus Literal choices."""
    origin = typing.get_origin(hint)
    if hint in (int, float, bool, str):
        return hint, None, False
    if origin is Literal:
        choices = typing.get_args(hint)
        kinds = {type(c) for c in choices}
        return (kinds.pop() if len(kinds) == 1 else Any), choices, False
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            inner, choices, is_tuple = _config_type(args[0])
            # OmegaConf understands typing.Optional, not the X | None union object.
            return (Optional[inner] if inner is not Any else Any), choices, is_tuple  # noqa: UP045
        return Any, None, False
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        elem = args[0] if len(set(args)) == 1 and args[0] in (int, float, bool, str) else Any
        return list[elem], None, origin is tuple  # type: ignore[valid-type]
    return Any, None, False


def schema(entry: registry.Entry) -> type:
    """A dataclass describing ``entry``'s config node (``_name_`` plus its parameters)."""
    fields: list[tuple[str, Any, Any]] = [(NAME_KEY, str, dataclasses.field(default=entry.name))]
    for p in params_of(entry.obj):
        if isinstance(p.default, list):
            default = dataclasses.field(default_factory=lambda d=p.default: list(d))
        else:
            default = dataclasses.field(default=p.default)
        fields.append((p.name, p.type, default))
    return dataclasses.make_dataclass(f"{entry.kind}:{entry.name}", fields)


def register_configs() -> None:
    """Store every registered component's schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from unfog.schemas import register_static_schemas

    OmegaConf.register_new_resolver("unfog_dirname", short_dirname, replace=True)
    cs = ConfigStore.instance()
    for kind in registry.KINDS:
        for entry in registry.entries(kind):
            cs.store(group=GROUPS.get(kind, kind), name=entry.name, node=schema(entry),
                     package=package_of(kind, entry.name), provider=entry.distribution or "unfog")
    register_static_schemas(cs)


GROUPS: dict[str, str] = {"exporter": "format"}
"""Config groups not named after their kind: ``unfog export format=diffusers`` picks an exporter."""


def package_of(kind: str, name: str) -> str | None:
    """Where a chosen option lands in the composed config. A model takes any number of
    conditioners, so ``conditioner=text`` fills ``conditioners.text`` and
    ``conditioner=[text,scalar]`` fills both; ``+conditioner@conditioners.KEY=NAME`` adds one
    under a key of the user's choosing (two of the same kind, for example). Metrics likewise:
    ``metric=[fid,kid]`` fills ``metrics.fid`` and ``metrics.kid``."""
    if kind == "conditioner":
        return f"conditioners.{name}"
    return f"metrics.{name}" if kind == "metric" else None


DIRNAME_MAX = 100


def short_dirname(name: str, limit: int = DIRNAME_MAX) -> str:
    """A sweep job's folder name from its overrides, cut to ``limit`` characters with a hash
    of the whole when longer (file systems refuse names over 255 bytes)."""
    import hashlib

    name = name.replace("/", "_")
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9]}~{digest}"


def plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def component_kwargs(kind: str, node: Mapping[str, Any]) -> tuple[registry.Entry, dict[str, Any]]:
    """Validate a component's config node and return its entry and constructor kwargs.

    Checks what OmegaConf cannot: Literal choices, required fields, and that the
    arguments bind to the constructor. Lists become tuples where the signature wants one.
    """
    node = dict(plain(node))
    if NAME_KEY not in node:
        raise ConfigError(f"The {kind} config has no {NAME_KEY!r}; select one with `{kind}=NAME`.")
    name = node.pop(NAME_KEY)
    entry = registry.get(kind, name)
    params = {p.name: p for p in params_of(entry.obj)}
    kwargs: dict[str, Any] = {}
    for key, value in node.items():
        p = params.get(key)
        if p is None:
            raise ConfigError(
                f"{kind} {name!r} has no parameter {key!r}; its parameters are: {', '.join(params) or 'none'}."
            )
        if value == MISSING or value == "???":
            raise ConfigError(f"{kind} {name!r} needs a value for {key!r}: add `{kind}.{key}=VALUE`.")
        if p.choices is not None and value is not None and value not in p.choices:
            raise ConfigError(
                f"{kind} {name!r}: {key} must be one of {', '.join(map(str, p.choices))}; got {value!r}."
            )
        kwargs[key] = tuple(value) if p.is_tuple and isinstance(value, list) else value
    return entry, kwargs


def build(kind: str, node: Mapping[str, Any], **wiring: Any) -> Any:
    """Build a component from its config node; ``wiring`` fills the parameters it accepts."""
    entry, kwargs = component_kwargs(kind, node)
    accepted = inspect.signature(entry.obj).parameters
    kwargs.update({k: v for k, v in wiring.items() if k in accepted})
    try:
        inspect.signature(entry.obj).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"Could not build {kind} {entry.name!r}: {exc}") from exc
    return entry.obj(**kwargs)
