"""``deepspec-eval [hydra overrides]``: the eval stage's command line (also ``python eval/eval.py``)."""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from deepspec.config import CONFIG_DIR, EvalStageConfig, register_configs, to_dataclass
from deepspec.process_exit import hydra_errors_in_one_line, run_entry_point, storage_errors_in_one_line

log = logging.getLogger("deepspec.eval")


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base=None)
@storage_errors_in_one_line("eval")
def _hydra_main(cfg: DictConfig) -> None:
    stage = to_dataclass(cfg, EvalStageConfig)
    from deepspec.evaluation.harness import EvalHarness
    from deepspec.evaluation.report import write_report

    results = EvalHarness(stage).run()
    summary = write_report(results, stage.run_dir)
    from deepspec.evaluation.plots import write_plots

    write_plots(results, stage.run_dir)
    from deepspec.evaluation.report import log_report_to_wandb

    log_report_to_wandb(results, stage.run_dir, stage.wandb)
    for name, entry in results["datasets"].items():
        r = entry["sampled"]
        print(f"{name}: tau {r['tau']:.2f} (T={stage.temperature}), wall-clock speedup {r['speedup']:.2f}x vs plain decoding")
    print(f"report: {summary}")


def main() -> None:
    run_entry_point(lambda: (register_configs(), hydra_errors_in_one_line("eval", _hydra_main)))


if __name__ == "__main__":
    main()
