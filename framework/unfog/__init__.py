"""unfog: a plugin-based framework for diffusion models.

The public Python API is the registry: ``unfog.available(kind, pattern)`` lists components,
``unfog.create(kind, name, **kwargs)`` builds one, ``@unfog.register(kind, name)`` adds one.
Importing ``unfog`` is cheap: torch and the plugins load on first use.
"""

from __future__ import annotations

from unfog.registry import KINDS, available, create, discover, get, plugins, register

__version__ = "0.1.0"

__all__ = ["KINDS", "__version__", "available", "create", "discover", "get", "plugins", "register"]
