"""``deepspec-train [hydra overrides]``: the train stage's command line.

Also ``python train/train.py ...`` and ``torchrun --nproc_per_node N train/train.py ...``.
"""
from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from deepspec.config import CONFIG_DIR, TrainStageConfig, register_configs, to_dataclass

log = logging.getLogger("deepspec.train")


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    stage = to_dataclass(cfg, TrainStageConfig)
    from deepspec.training.trainer import Trainer  # heavy imports after the config is known to be valid

    result = Trainer(stage).fit()
    log.info("done: %s", result)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
