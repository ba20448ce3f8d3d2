"""Shared pieces of the typed configs: the error type and small field checks.

Every config dataclass has a ``problems(prefix)`` method returning a list of messages, each naming
the full key to change (``cache.storage_dtype``). ``check(cfg)`` gathers them and raises one
``ConfigError`` at start-up, before any model is loaded.
"""
from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """A configuration that cannot work; the message lists every bad key."""


def one_of(prefix: str, key: str, value: Any, allowed: Iterable[Any]) -> list[str]:
    allowed = list(allowed)
    return [] if value in allowed else [f"{prefix}{key}={value!r} is not one of {allowed}"]


def at_least(prefix: str, key: str, value: float, low: float) -> list[str]:
    return [] if value >= low else [f"{prefix}{key}={value!r} must be >= {low}"]


def check(cfg: Any, prefix: str = "") -> None:
    """Raise one ConfigError listing every problem of ``cfg`` (a config dataclass)."""
    problems = cfg.problems(prefix)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
