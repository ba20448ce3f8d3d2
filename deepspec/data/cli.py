"""``deepspec-data {build,verify,stats,estimate} [hydra overrides]``: the data stage's command line.

Also runs as ``python data/cache.py ...`` and ``torchrun --nproc_per_node N data/cache.py build ...``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepspec.config import CONFIG_DIR, DataStageConfig, register_configs, to_dataclass
from deepspec.data.cache.manifest import check_target, load_manifest
from deepspec.data.cache.verify import cache_stats, verify_cache
from deepspec.process_exit import hydra_errors_in_one_line, run_entry_point, storage_errors_in_one_line

log = logging.getLogger("deepspec.data")
COMMANDS = ("build", "verify", "stats", "estimate", "finalize")


def run(cfg: DataStageConfig) -> int:
    """Run one command; returns the process exit code."""
    if cfg.command == "build":
        from deepspec.data.build import build_cache  # heavy imports only where needed

        manifest = build_cache(cfg)
        if manifest is not None:  # this process wrote the manifest (rank 0, or the last array part)
            c = manifest["counts"]
            log.info("cache ready: %s (%d samples, %d tokens, %d shards, %.0f bytes/token, %d dropped, %d malformed)",
                     Path(cfg.out_dir) / "manifest.json", c["samples"], c["tokens"], len(manifest["shards"]),
                     manifest["bytes_per_token"], c["dropped_short"], c["malformed"])
            log_manifest_to_wandb(cfg, manifest)
        return 0
    if cfg.command == "estimate":
        from deepspec.data.estimate import estimate_cache

        print(json.dumps(estimate_cache(cfg), indent=1))
        return 0
    if cfg.command == "finalize":
        from deepspec.data.cache.manifest import finalize

        manifest = finalize(Path(cfg.out_dir))
        log_manifest_to_wandb(cfg, manifest)
        log.info("manifest written: %d shards, %d samples", len(manifest["shards"]), manifest["counts"]["samples"])
        return 0
    if cfg.command == "verify":
        report = verify_cache(cfg.out_dir)
        print(json.dumps(report, indent=1))
        if report["ok"]:
            from deepspec.target import target_identity

            check_target(load_manifest(cfg.out_dir), target_identity(cfg.target), cfg.target.layer_ids, cfg.out_dir)
        return 0 if report["ok"] else 1
    print(json.dumps(cache_stats(cfg.out_dir), indent=1))
    return 0


def log_manifest_to_wandb(cfg: DataStageConfig, manifest: dict) -> None:
    """The data stage's W&B run: the cache's counts and sizes as the summary, one table row per shard."""
    from deepspec.tracking import start_wandb_run

    run = start_wandb_run(cfg.wandb, "data", Path(cfg.out_dir), {"cache_dir": str(cfg.out_dir), **{
        k: manifest[k] for k in ("format", "storage_dtype", "layer_ids", "hidden_size", "max_length", "num_rows", "sources")}})
    if run is None:
        return
    import wandb

    stats = {f"data/{k}": v for k, v in manifest["counts"].items()}
    stats.update({"data/shards": len(manifest["shards"]), "data/bytes": manifest["bytes"],
                  "data/bytes_per_token": manifest["bytes_per_token"]})
    run.log(stats)
    run.log({"data/shard_table": wandb.Table(columns=["file", "samples", "tokens", "bytes", "sha256"],
                                             data=[[s["file"], s["samples"], s["tokens"], s["bytes"], s["sha256"]]
                                                   for s in manifest["shards"]])})
    run.summary.update(stats)
    run.finish()


@hydra.main(config_path=str(CONFIG_DIR), config_name="data", version_base=None)
@storage_errors_in_one_line("data")
def _hydra_main(cfg: DictConfig) -> None:
    code = run(to_dataclass(cfg, DataStageConfig))
    if code:
        sys.exit(code)


def main() -> None:
    register_configs()
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:  # `deepspec-data verify ...` -> `command=verify`
        sys.argv[1] = f"command={sys.argv[1]}"
    run_entry_point(lambda: hydra_errors_in_one_line("data", _hydra_main))


if __name__ == "__main__":
    main()
