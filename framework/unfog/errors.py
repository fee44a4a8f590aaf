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


class CheckpointError(UnfogError, ValueError):
    """A checkpoint or export that cannot be read: missing, damaged, unsafe, or not unfog's."""


class Interrupted(UnfogError):
    """Training stopped on Ctrl-C or SIGTERM after writing a checkpoint to resume from."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
