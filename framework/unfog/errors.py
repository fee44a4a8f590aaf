"""Errors raised by unfog. Each says what was wrong, what was expected and what to do."""

from __future__ import annotations


class UnfogError(Exception):
    """Base class of every error unfog raises on purpose."""


class RegistryError(UnfogError, LookupError):
    """An unknown or duplicate component name."""


class ConfigError(UnfogError, ValueError):
    """A configuration that cannot work, refused before anything is built or trained."""


class DataError(UnfogError):
    """Data that cannot be read, or is not where it was expected."""


class NonFiniteLossError(UnfogError, FloatingPointError):
    """Training produced a NaN or infinite loss."""
