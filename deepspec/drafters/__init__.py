"""The drafters, one file each, and the registry the trainer, export and eval pick them from."""
from __future__ import annotations

from dataclasses import dataclass

from deepspec.drafters.dflash import DFlashConfig, DFlashDrafter
from deepspec.drafters.dspark import DSparkConfig, DSparkDrafter
from deepspec.drafters.eagle3 import Eagle3Config, Eagle3Drafter


@dataclass(frozen=True)
class DrafterSpec:
    config_class: type
    model_class: type
    kind: str  # "block" (one parallel pass per block) or "chain" (autoregressive, Eagle3)


DRAFTERS = {
    "dspark": DrafterSpec(DSparkConfig, DSparkDrafter, "block"),
    "dflash": DrafterSpec(DFlashConfig, DFlashDrafter, "block"),
    "eagle3": DrafterSpec(Eagle3Config, Eagle3Drafter, "chain"),
}

__all__ = ["DRAFTERS", "DFlashConfig", "DFlashDrafter", "DSparkConfig", "DSparkDrafter", "DrafterSpec",
           "Eagle3Config", "Eagle3Drafter"]
