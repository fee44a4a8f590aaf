"""One registry per kind of component, filled by plugins found through entry points.

Plugins are packages that declare an entry point in the group ``unfog.plugins``; importing
the named module registers its components with :func:`register`. Discovery is lazy (it
runs on the first look-up), cached, and fault tolerant: a plugin that fails to import is
recorded with its distribution and error, a warning is issued, and the rest keeps working.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import importlib.metadata as metadata
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from unfog.errors import RegistryError

KINDS: tuple[str, ...] = (
    "backbone", "schedule", "sampler", "conditioner", "dataset", "metric", "autoencoder", "exporter", "pipeline",
)
ENTRY_POINT_GROUP = "unfog.plugins"

T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """A registered component: its kind, name, the callable that builds it and who provides it."""

    kind: str
    name: str
    obj: Callable[..., Any]
    module: str
    distribution: str | None
    replaces: tuple[str, ...] = ()

    @property
    def provider(self) -> str:
        """Human-readable origin, e.g. ``unfog 0.1.0 (unfog_samplers.ddim)``."""
        dist = self.distribution or "no installed distribution"
        return f"{dist} ({self.module}.{getattr(self.obj, '__qualname__', self.obj)})"

    @property
    def summary(self) -> str:
        """First line of the component's docstring."""
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass
class Plugin:
    """One entry point of the ``unfog.plugins`` group and what loading it gave."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    error: str | None = None
    provides: list[tuple[str, str]] = field(default_factory=list)


_entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_renamed: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}  # old name -> current name
_plugins: list[Plugin] = []
_pending: list[metadata.EntryPoint] = []  # entry points found but not imported yet
_discovered = False
_lock = threading.RLock()
_loading: list[Plugin] = []  # the plugin being imported, so registrations know their source


def _check_kind(kind: str) -> None:
    if kind not in _entries:
        raise RegistryError(f"Unknown kind {kind!r}; the kinds are: {', '.join(KINDS)}.")


def _distribution_of(module: str) -> str | None:
    top = module.split(".")[0]
    dists = _packages_distributions().get(top)
    return dists[0] if dists else None


_pkg_dists: dict[str, list[str]] | None = None


def _packages_distributions() -> dict[str, list[str]]:
    global _pkg_dists
    if _pkg_dists is None:
        _pkg_dists = dict(metadata.packages_distributions())
    return _pkg_dists


def register(kind: str, name: str, *, replaces: tuple[str, ...] | list[str] = ()) -> Callable[[T], T]:
    """Register a component class or factory under ``kind``/``name``; use as a decorator.

    ``replaces`` lists former names of this component (one it took over from, say): configs
    stored in older checkpoints still find it under them, and it may rewrite such a config
    with an ``upgrade_config`` method (:class:`unfog.protocols.Upgradable`). Former names
    are not listed by :func:`available` and are not config-group options.

    Raises:
        RegistryError: if ``name`` (or a former name) is already taken by another provider.
    """
    _check_kind(kind)

    def decorator(obj: T) -> T:
        module = getattr(obj, "__module__", "?")
        loading = _loading[-1] if _loading else None
        dist = loading.distribution if loading else _distribution_of(module)
        entry = Entry(kind, name, obj, module, dist, tuple(replaces))
        with _lock:
            for key in (name, *entry.replaces):
                old = _entries[kind].get(key) or _entries[kind].get(_renamed[kind].get(key, ""))
                same = old is not None and (old.module, _qualname(old.obj)) == (module, _qualname(obj))
                if old is not None and not same:
                    raise RegistryError(
                        f"Duplicate {kind} name {key!r}: provided by {old.provider} "
                        f"and by {entry.provider}. Rename one of them or uninstall one distribution."
                    )
            _entries[kind][name] = entry
            for former in entry.replaces:
                _renamed[kind][former] = name
            if loading is not None:
                loading.provides.append((kind, name))
        return obj

    return decorator


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", repr(obj))


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def discover(*, refresh: bool = False) -> list[Plugin]:
    """Import every ``unfog.plugins`` entry point once and return what each provided.

    Re-entrant: a plugin that looks a component up while it is being imported (to subclass
    another plugin's sampler, say) gets it whatever the entry points' order, because a
    look-up that misses imports the plugins not imported yet (:func:`get`)."""
    global _discovered
    with _lock:
        if _discovered and not refresh:
            _load_pending()
            return list(_plugins)
        _discovered = True
        if refresh:
            global _pkg_dists
            _pkg_dists = None
            importlib.invalidate_caches()  # see distributions pip-installed since the last look
        known = {(p.name, p.module) for p in _plugins} | {(ep.name, ep.value) for ep in _pending}
        _pending.extend(ep for ep in _entry_points() if (ep.name, ep.value) not in known)
        _load_pending()
        return list(_plugins)


def _load_pending(until: Callable[[], bool] | None = None) -> None:
    """Import pending entry points in name order, stopping early once ``until()`` holds."""
    while _pending and not (until is not None and until()):
        _load(_pending.pop(0))


def _load(ep: metadata.EntryPoint) -> None:
    dist = ep.dist.name if ep.dist is not None else None
    version = ep.dist.version if ep.dist is not None else None
    plugin = Plugin(ep.name, ep.value, dist, version)
    _plugins.append(plugin)
    _loading.append(plugin)
    try:
        importlib.import_module(ep.value)
    except Exception as exc:  # a broken plugin must not break the others
        plugin.error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"unfog plugin {ep.name!r} from distribution {dist!r} failed to import "
            f"({plugin.error}); its components are unavailable, everything else works.",
            RuntimeWarning,
            stacklevel=4,
        )
    finally:
        _loading.pop()


def plugins() -> list[Plugin]:
    """The discovered plugins, with their distribution, version, error and components."""
    return discover()


def available(kind: str, pattern: str | None = None) -> list[str]:
    """Sorted names registered for ``kind``, optionally filtered by a glob ``pattern``."""
    _check_kind(kind)
    discover()
    names = sorted(_entries[kind])
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def get(kind: str, name: str) -> Entry:
    """The registry entry for ``kind``/``name``.

    Raises:
        RegistryError: naming close matches, everything available and broken plugins.
    """
    _check_kind(kind)
    with _lock:
        discover()
        _load_pending(until=lambda: _lookup(kind, name) is not None)  # called from a plugin being imported
        entry = _lookup(kind, name)
    if entry is None:
        raise RegistryError(_unknown_message(kind, name))
    return entry


def _lookup(kind: str, name: str) -> Entry | None:
    entries = _entries[kind]
    return entries.get(name) or entries.get(_renamed[kind].get(name, ""))


def entries(kind: str) -> list[Entry]:
    """Every entry of ``kind``, sorted by name."""
    return [get(kind, n) for n in available(kind)]


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Build the component ``kind``/``name`` with keyword arguments."""
    return get(kind, name).obj(**kwargs)


def _unknown_message(kind: str, name: str) -> str:
    names = sorted(_entries[kind])
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    msg = f"Unknown {kind} {name!r}."
    if close:
        msg += f" Did you mean {', '.join(repr(c) for c in close)}?"
    msg += f" Available {kind}s: {', '.join(names) or '(none)'}."
    broken = [p for p in _plugins if p.error]
    if broken:
        msg += " Plugins that failed to load: " + "; ".join(
            f"{p.name} from {p.distribution} ({p.error})" for p in broken
        )
        msg += "."
    msg += " A plugin distribution may provide it: pip install it, then `unfog plugins`."
    return msg


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Run a block with registrations that are undone afterwards (for tests)."""
    with _lock:
        discover()
        saved = {kind: dict(v) for kind, v in _entries.items()}
        saved_renamed = {kind: dict(v) for kind, v in _renamed.items()}
        saved_plugins = list(_plugins)
    try:
        yield
    finally:
        with _lock:
            for kind, v in saved.items():
                _entries[kind] = v
            for kind, v in saved_renamed.items():
                _renamed[kind] = v
            _plugins[:] = saved_plugins
