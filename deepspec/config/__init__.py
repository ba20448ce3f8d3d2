"""Typed configs, one module per stage, registered in Hydra's ConfigStore.

The YAML tree in ``configs/`` picks presets (``target/``, ``cache/``); the dataclasses here give
every key its type and docstring, and ``check`` validates a whole stage config at start-up.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepspec.config.base import ConfigError, WandbConfig, check
from deepspec.config.data import CacheConfig, DataStageConfig, InputConfig, RegenerateConfig, TargetConfig, resolve_layer_selection
from deepspec.config.eval import EvalStageConfig
from deepspec.config.train import TrainStageConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


def register_configs() -> None:
    """Register the schemas so that YAML files can name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="data_schema", node=DataStageConfig)
    cs.store(name="train_schema", node=TrainStageConfig)
    cs.store(name="eval_schema", node=EvalStageConfig)
    cs.store(group="target", name="target_schema", node=TargetConfig)
    cs.store(group="cache", name="cache_schema", node=CacheConfig)
    cs.store(group="wandb", name="wandb_schema", node=WandbConfig)
    # configs/hydra/launcher/submitit_*.yaml take their schema from the plugin's ConfigStore entry of
    # the same name (Hydra's "automatic schema matching"); it works in Hydra 1.3 but warns on every run.
    warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_\w+' is validated against ConfigStore schema")


def to_dataclass(cfg: DictConfig, schema: type):
    """Merge a Hydra DictConfig onto ``schema``, convert to the dataclass and validate it."""
    # Through a plain container: keys appended with `+key=...` must meet the schema too.
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, plain)
    except OmegaConfBaseException as e:
        key = _first_unmergeable_key(base, plain)
        if key is None:
            raise
        raise ConfigError(f"invalid configuration:\n  - {key}: {str(e).splitlines()[0]}") from None
    obj = OmegaConf.to_object(merged)
    check(obj)
    if isinstance(getattr(obj, "target", None), TargetConfig):
        try:
            resolve_layer_selection(obj.target)
        except ValueError as e:
            raise ConfigError(f"invalid configuration:\n  - {e}") from None
    return obj


def _first_unmergeable_key(base: DictConfig, plain: DictConfig, prefix: str = "") -> str | None:
    """The full key of the first value that cannot merge onto the schema (OmegaConf's own message may not name it)."""
    for key, value in plain.items():
        try:
            OmegaConf.merge(base, {key: value})
        except OmegaConfBaseException:
            node = base.get(key) if key in base else None
            if isinstance(node, DictConfig) and isinstance(value, DictConfig):
                return _first_unmergeable_key(node, value, f"{prefix}{key}.") or f"{prefix}{key}"
            return f"{prefix}{key}"
    return None


__all__ = [
    "CONFIG_DIR", "CacheConfig", "EvalStageConfig", "ConfigError", "DataStageConfig", "InputConfig", "RegenerateConfig",
    "TargetConfig", "TrainStageConfig", "WandbConfig", "check", "register_configs", "to_dataclass",
]
