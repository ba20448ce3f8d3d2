"""``deepspec-train [hydra overrides]``: the train stage's command line.

Also ``python train/train.py ...`` and ``torchrun --nproc_per_node N train/train.py ...``.
"""
from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from deepspec.config import CONFIG_DIR, TrainStageConfig, register_configs, to_dataclass
from deepspec.process_exit import hydra_errors_in_one_line, run_entry_point, storage_errors_in_one_line

log = logging.getLogger("deepspec.train")


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
@storage_errors_in_one_line("train")
def _hydra_main(cfg: DictConfig) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    stage = to_dataclass(cfg, TrainStageConfig)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # One sweep point per job: its own run_dir (Hydra's sweep subdirectory, config in .hydra/),
        # so jobs never share checkpoints and a requeued job finds its own.
        stage.run_dir = hydra_cfg.runtime.output_dir
    from deepspec.training.trainer import Trainer  # heavy imports after the config is known to be valid

    result = Trainer(stage).fit()
    if result.get("preempted"):
        from deepspec.training.preemption import PREEMPTED_EXIT_CODE

        sys.exit(PREEMPTED_EXIT_CODE)  # the batch script requeues; the next run resumes (checkpoint.resume=auto)
    log.info("done: %s", result)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    run_entry_point(lambda: (register_configs(), hydra_errors_in_one_line("train", _hydra_main)))


if __name__ == "__main__":
    main()
