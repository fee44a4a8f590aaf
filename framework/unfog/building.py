"""From a composed config to a model: checks that need no data, the ``auto`` choices made from
the data, checks that need the data, and the model (backbone + conditioners) wired together.

Training builds through here, and so does loading: a checkpoint stores the resolved config,
which :func:`upgrade` brings up to date with the installed components before it is rebuilt.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from unfog import registry
from unfog.config import NAME_KEY, build, component_kwargs, plain
from unfog.diffusion import check_prediction, check_weighting, sigma_data_of
from unfog.errors import ConfigError
from unfog.model import DiffusionModel
from unfog.protocols import Resolver, Upgradable

COMPONENT_KINDS = ("dataset", "backbone", "schedule", "sampler", "autoencoder")


def conditioner_nodes(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config nodes of a model's conditioners by key (``conditioners.KEY``); a checkpoint
    written before several conditioners were possible has one under ``conditioner``. Nodes
    without a ``_name_`` are settings for a conditioner ``conditioner=auto`` may choose
    (``conditioners.class_label.dim=64``), not conditioners of their own."""
    nodes = dict(cfg.get("conditioners") or {})
    old = cfg.get("conditioner")
    if old is not None and not nodes:
        nodes[dict(plain(old))[NAME_KEY]] = old
    return {k: v for k, v in nodes.items() if v is not None and NAME_KEY in dict(plain(v))}


def _settings_for_auto(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``conditioners.KEY.FIELD=...`` given without ``conditioner=KEY``: settings for what
    ``conditioner=auto`` may choose."""
    nodes = dict(plain(cfg.get("conditioners")) or {})
    return {k: dict(v) for k, v in nodes.items() if isinstance(v, Mapping) and v and NAME_KEY not in v}


def route_of(entry: registry.Entry, node: Mapping[str, Any]) -> str:
    """A conditioner's route: its ``route`` setting if it has one, else its class's."""
    own = dict(plain(node)).get("route")
    return str(own or (entry.obj.route if hasattr(entry.obj, "route") else "?"))


def is_resolver(kind: str, node: Mapping[str, Any] | None) -> bool:
    """Whether ``node`` selects an ``auto`` entry, chosen from the data (:class:`Resolver`)."""
    return node is not None and isinstance(registry.get(kind, dict(plain(node))[NAME_KEY]).obj, Resolver)


def validate(cfg: Mapping[str, Any]) -> dict[str, registry.Entry]:
    """Check a composed train config without building anything; return the chosen entries.

    Refuses unknown components, bad parameter values and prediction targets, and
    combinations that cannot work, with a message that says why. Entries chosen from the
    data (``backbone=auto``, ``conditioner=auto``) are checked again once resolved.
    """
    check_prediction(cfg["prediction"])
    check_weighting((cfg.get("loss") or {}).get("weighting", "uniform"))
    loose = _settings_for_auto(cfg)
    if loose and not any(is_resolver("conditioner", n) for n in conditioner_nodes(cfg).values()):
        key = next(iter(loose))
        raise ConfigError(f"conditioners.{key} sets {sorted(loose[key])} but no conditioner {key!r} is chosen; "
                          f"add conditioner={key} (or +conditioner@conditioners.{key}=NAME).")
    chosen = {kind: component_kwargs(kind, cfg[kind])[0] for kind in COMPONENT_KINDS if cfg.get(kind) is not None}
    backbone = chosen["backbone"].obj
    routes = list(backbone.routes) if hasattr(backbone, "routes") else []
    for key, node in conditioner_nodes(cfg).items():
        entry = chosen[f"conditioners.{key}"] = component_kwargs("conditioner", node)[0]
        if isinstance(entry.obj, Resolver):
            continue
        route = route_of(entry, node)
        if route not in routes:
            raise ConfigError(
                f"conditioner {key!r} ({entry.name}) routes to {route!r}, but backbone "
                f"{chosen['backbone'].name!r} consumes only {routes}"
                + ("; give it route=vector if it has that setting." if "route" in dict(plain(node)) else ".")
            )
    schedule = build("schedule", cfg["schedule"])
    check_schedule_and_prediction(schedule, cfg["prediction"])
    sigma_data_of(schedule, cfg.get("sigma_data"))
    guidance = plain((cfg.get("sampling") or {}).get("guidance", 1.0))
    if guidance not in (1.0, "auto") and not conditioner_nodes(cfg):
        raise ConfigError(
            f"sampling.guidance={guidance} needs a conditioner; set sampling.guidance=1 or add conditioner=NAME."
        )
    return chosen


def check_schedule_and_prediction(schedule: Any, prediction: str) -> None:
    """Refuse ``eps`` prediction on a schedule that reaches α = 0: x̂₀ = (x − σ·ε̂)/α has no
    value there (Lin et al. 2024, Sec. 3.2)."""
    alpha_end = float(schedule.alpha(torch.tensor([1.0], dtype=torch.float64))[0])
    if prediction == "eps" and alpha_end < 1e-5:  # zero terminal SNR (to float precision)
        raise ConfigError(
            f"prediction=eps cannot work with this schedule: α(1) = {alpha_end:.2g}, so x₀ cannot be "
            "recovered from a noise prediction at t = 1. Use prediction=v, x0, flow or edm."
        )


def data_facts(dataset: Any) -> dict[str, Any]:
    """What ``auto`` entries may choose from: the data's shape, batch fields and classes."""
    return {"data_shape": tuple(dataset.data_shape), "fields": tuple(dataset.fields),
            "num_classes": dataset.num_classes}


def resolve(cfg: dict[str, Any], dataset: Any) -> dict[str, str]:
    """Replace ``auto`` entries of a plain train config by what they choose for ``dataset``, in
    place; return a line per choice for the run's log (``{"backbone": "unet channels=16 ..."}``)."""
    facts = data_facts(dataset)
    choices: dict[str, str] = {}
    if is_resolver("backbone", cfg["backbone"]):
        cfg["backbone"] = complete("backbone", _resolved("backbone", cfg["backbone"], facts))
        choices["backbone"] = describe_node("backbone", cfg["backbone"])
    nodes: dict[str, Any] = {}
    loose = _settings_for_auto(cfg)
    for key, node in conditioner_nodes(cfg).items():
        if is_resolver("conditioner", node):
            picked = {k: complete("conditioner", {**n, **loose.pop(k, {})})
                      for k, n in _resolved("conditioner", node, facts).items()}
            choices["conditioner"] = "; ".join(describe_node("conditioner", n) for n in picked.values()) or "none"
            nodes |= picked
        else:
            nodes[key] = node
    if loose:
        key = next(iter(loose))
        raise ConfigError(f"conditioners.{key} sets {sorted(loose[key])}, but conditioner=auto chose "
                          f"{sorted(nodes) or 'no conditioner'} for this data; choose it with conditioner={key}.")
    cfg["conditioners"] = nodes
    cfg.pop("conditioner", None)
    return choices


def _resolved(kind: str, node: Mapping[str, Any], facts: Mapping[str, Any]) -> Any:
    entry, kwargs = component_kwargs(kind, node)
    accepted = inspect.signature(entry.obj.resolve).parameters
    wanted = {k: v for k, v in facts.items() if k in accepted or any(p.kind == p.VAR_KEYWORD
                                                                      for p in accepted.values())}
    return plain(entry.obj.resolve(**wanted, **kwargs))


def complete(kind: str, node: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with every field of its component, as composing ``KIND=NAME`` would give it:
    the values it sets, the schema's defaults for the rest (typed and checked the same way)."""
    from omegaconf import OmegaConf

    from unfog.config import schema

    entry = registry.get(kind, dict(plain(node))[NAME_KEY])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema(entry)), dict(plain(node)))
    except Exception as exc:  # OmegaConf's validation errors: a wrong key or type
        raise ConfigError(f"{kind} {entry.name!r}: {exc}".splitlines()[0]) from exc
    return dict(plain(merged))


def describe_node(kind: str, node: Mapping[str, Any]) -> str:
    """``unet channels=16 channel_mult=[1, 2] ...``: a config node on one line, with the values
    that differ from the component's defaults."""
    from unfog.config import params_of

    node = dict(plain(node))
    defaults = {p.name: p.default for p in params_of(registry.get(kind, node[NAME_KEY]).obj)}
    settings = " ".join(f"{k}={v}" for k, v in node.items()
                        if k != NAME_KEY and _plain_default(defaults.get(k, object())) != v)
    return f"{node[NAME_KEY]} {settings}".strip()


def _plain_default(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_data(cfg: Mapping[str, Any], dataset: Any) -> None:
    """Refuse a backbone or conditioner that does not fit the data, before building the model
    (routes between them are :func:`validate`'s)."""
    backbone = registry.get("backbone", dict(plain(cfg["backbone"]))[NAME_KEY])
    dataset_name = dict(plain(cfg["dataset"])).get(NAME_KEY, "?")
    rank = len(dataset.data_shape)
    offset = float((cfg.get("loss") or {}).get("offset_noise", 0.0))
    if offset > 0 and rank < 2:
        raise ConfigError(
            f"loss.offset_noise={offset} shifts each channel of an image, but dataset "
            f"{dataset_name!r} gives samples of shape {tuple(dataset.data_shape)} with no positions; "
            "set loss.offset_noise=0."
        )
    if (cfg.get("data") or {}).get("hflip") and rank != 3:
        raise ConfigError(
            f"data.hflip=true mirrors images left-right, but dataset {dataset_name!r} gives samples of shape "
            f"{tuple(dataset.data_shape)}, not C×H×W images; set data.hflip=false."
        )
    if rank not in backbone.obj.data_ranks:
        raise ConfigError(
            f"backbone {backbone.name!r} takes samples of rank {list(backbone.obj.data_ranks)}, but dataset "
            f"{dataset_name!r} gives shape {tuple(dataset.data_shape)} (rank {rank}); "
            f"choose another backbone (`unfog list backbone`) or backbone=auto."
        )
    for key, node in conditioner_nodes(cfg).items():
        entry = registry.get("conditioner", dict(plain(node))[NAME_KEY])
        default = inspect.signature(entry.obj).parameters.get("field")
        field = dict(plain(node)).get("field", default.default if default else None)
        if field not in dataset.fields:
            raise ConfigError(
                f"conditioner {key!r} ({entry.name}) reads the batch field {field!r}, but dataset "
                f"{dataset_name!r} provides only {list(dataset.fields)}; set "
                f"conditioners.{key}.field to one of those, drop it with `~conditioner`, or pick a "
                f"dataset that has {field!r}."
            )


def build_model(cfg: Mapping[str, Any], data_shape: tuple[int, ...], num_classes: int | None) -> DiffusionModel:
    """The backbone and its conditioners, wired to the data and to each other."""
    conditioners = {
        key: build("conditioner", node, num_classes=num_classes, data_shape=tuple(data_shape))
        for key, node in conditioner_nodes(cfg).items()
    }
    by_route: dict[str, dict[str, int]] = {}
    for key, c in conditioners.items():
        by_route.setdefault(c.route, {})[key] = int(c.dim)
    widths = set(by_route.get("tokens", {}).values())
    if len(widths) > 1:
        raise ConfigError(
            f"token conditioners are joined along the sequence, so they need one width; got "
            f"{by_route['tokens']}. Give them the same dim (or route one of them to vector)."
        )
    backbone = build(
        "backbone", cfg["backbone"], data_shape=tuple(data_shape),
        cond_dim=sum(by_route.get("vector", {}).values()),
        context_dim=widths.pop() if widths else 0,
        cond_channels=sum(by_route.get("concat", {}).values()),
    )
    return DiffusionModel(backbone, conditioners)


def auto_guidance(model: DiffusionModel) -> float:
    """``guidance: auto``: 2 when a conditioner was trained with dropout (so the model has an
    unconditional mode to guide against), else 1 (no guidance)."""
    return 2.0 if any(c.dropout > 0 for c in model.conditioners.values()) else 1.0


def upgrade(cfg: Mapping[str, Any], wiring: Mapping[str, Any]) -> dict[str, Any]:
    """A stored (checkpoint) config brought up to date with the installed components: a node
    naming a component by a former name (``register(..., replaces=...)``) or in an older form
    is rewritten by that component's ``upgrade_config`` (:class:`Upgradable`)."""
    cfg = dict(plain(cfg))
    for kind in COMPONENT_KINDS:
        if cfg.get(kind) is not None:
            cfg[kind] = _upgrade_node(kind, cfg[kind], wiring)
    cfg["conditioners"] = {key: _upgrade_node("conditioner", node, wiring)
                           for key, node in conditioner_nodes(cfg).items()}
    cfg.pop("conditioner", None)
    return cfg


def _upgrade_node(kind: str, node: Mapping[str, Any], wiring: Mapping[str, Any]) -> dict[str, Any]:
    node = dict(plain(node))
    entry = registry.get(kind, node[NAME_KEY])
    if isinstance(entry.obj, Upgradable):
        node = dict(entry.obj.upgrade_config(node, wiring))
    node[NAME_KEY] = entry.name
    return node
