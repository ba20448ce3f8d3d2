"""Shared pieces of the typed configs: the error type and small field checks.

Every config dataclass has a ``problems(prefix)`` method returning a list of messages, each naming
the full key to change (``cache.storage_dtype``). ``check(cfg)`` gathers them and raises one
``ConfigError`` at start-up, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional


class ConfigError(ValueError):
    """A configuration that cannot work; the message lists every bad key."""


def one_of(prefix: str, key: str, value: Any, allowed: Iterable[Any]) -> list[str]:
    allowed = list(allowed)
    return [] if value in allowed else [f"{prefix}{key}={value!r} is not one of {allowed}"]


def at_least(prefix: str, key: str, value: float, low: float) -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{prefix}{key}={value!r} must be a finite number >= {low}"]
    return [] if value >= low else [f"{prefix}{key}={value!r} must be >= {low}"]


def non_finite(cfg: Any, prefix: str = "") -> list[str]:
    """Every float anywhere in a config dataclass tree (lists and dicts included) that is inf or NaN, by full key:
    no setting means "infinitely much", and NaN passes every comparison-based check silently."""
    if dataclasses.is_dataclass(cfg):
        items = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    elif isinstance(cfg, dict):
        items = list(cfg.items())
    elif isinstance(cfg, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(cfg)]
    else:
        return []
    out = []
    for name, value in items:
        key = f"{prefix}{name}" if str(name).startswith("[") or not prefix else f"{prefix}.{name}"
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{key}={value!r} must be a finite number")
        else:
            out += non_finite(value, key)
    return out


def check(cfg: Any, prefix: str = "") -> None:
    """Raise one ConfigError listing every problem of ``cfg`` (a config dataclass)."""
    problems = non_finite(cfg, prefix.rstrip(".")) or cfg.problems(prefix)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass
class WandbConfig:
    """Weights & Biases: one run per stage, the stages of one pipeline in one group.

    ``configs/wandb/default.yaml`` fills these from the environment (WANDB_MODE, WANDB_PROJECT,
    WANDB_ENTITY, DEEPSPEC_RUN_GROUP), so ``slurm/pipeline.sh`` groups its three jobs by exporting
    one variable.
    """

    mode: str = "disabled"
    """online | offline (files under <output dir>/wandb, ``wandb sync`` later) | disabled."""
    project: str = "deepspec"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); None = the account's default."""
    group: Optional[str] = None
    """Run group: one pipeline's data, train and eval runs."""
    name: Optional[str] = None
    """Run name (default: <group>-<stage> in a group, else the output directory's name)."""

    def problems(self, prefix: str) -> list[str]:
        return one_of(prefix, "mode", self.mode, ("online", "offline", "disabled"))
