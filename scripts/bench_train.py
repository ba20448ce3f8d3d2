#!/usr/bin/env python
"""Training speed on this machine: seconds per optimizer step and tokens/s, per drafter and setting.

    python scripts/bench_train.py [--threads 2] [--steps 6] [--repeats 2] [--out eval/results/benchmarks/train_cpu.json]

The drafters are the reproduction study's (configs/reproduce/toy.yaml: parameter-matched DSpark,
DFlash, Eagle3) at its batch (8 samples) and anchors (32). Settings, each adding one change:

    baseline        micro-batch 1 x 8 accumulation, logits recomputed in backward, fp32   (the old defaults)
    micro_batch     one micro-batch of 8 samples (one forward/backward per step)
    kept_logits     + loss.recompute_logits=false (a third fewer vocabulary matmuls)
    bf16            + deepspeed.precision=bf16 (fast only where the CPU has AMX/AVX512_BF16)
    bf16_micro1     bf16 and kept logits with micro-batches of 1 (no padding: Eagle3 runs every position)

Settings are interleaved ``--repeats`` times in one process (the fastest counts), after one warm-up
step each. ``--profile`` adds the top operators of the last setting (torch.profiler, self CPU time).
Also records the CPU, its bf16 flags and what ``precision=auto`` picks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

SETTINGS = {
    "baseline": ["micro_batch_size=1", "loss.recompute_logits=true", "deepspeed.precision=fp32"],
    "micro_batch": ["micro_batch_size=8", "loss.recompute_logits=true", "deepspeed.precision=fp32"],
    "kept_logits": ["micro_batch_size=8", "loss.recompute_logits=false", "deepspeed.precision=fp32"],
    "bf16": ["micro_batch_size=8", "loss.recompute_logits=false", "deepspeed.precision=bf16"],
    "bf16_micro1": ["micro_batch_size=1", "loss.recompute_logits=false", "deepspeed.precision=bf16"],
}


def small_cache(cache: Path, rows: int) -> Path:
    """A toy cache of ``rows`` training prompts, built once (shared with bench_precision.py)."""
    from deepspec.config.data import DataStageConfig, InputConfig, TargetConfig
    from deepspec.data.build import build_cache

    if not (cache / "manifest.json").exists():
        build_cache(DataStageConfig(out_dir=str(cache), target=TargetConfig(name_or_path="toy", dtype="float32"),
                                    input=InputConfig(paths=[str(REPO / "deepspec/assets/toy_prompts/train.jsonl")], max_rows=rows),
                                    progress=False))
    return cache


def stage_config(drafter, cache: Path, run_dir: Path, setting: list[str], anchors: int):
    from hydra import compose, initialize_config_dir

    from deepspec.config import CONFIG_DIR, TrainStageConfig, register_configs, to_dataclass

    register_configs()
    overrides = ["target=toy", f"drafter={drafter.preset}", f"cache_dir={cache}", f"run_dir={run_dir}", "global_batch_size=8",
                 "logging.progress=false", "eval.val_fraction=0", "checkpoint.every_steps=1000000", "max_steps=1000",
                 *[f"drafter.{k}={v}" for k, v in drafter.fields.items()], *setting]
    if drafter.preset != "eagle3":
        overrides.append(f"drafter.num_anchors={anchors}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_dataclass(compose("train", overrides=overrides), TrainStageConfig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--drafters", nargs="+", default=["dspark", "dflash", "eagle3"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--study-config", default="configs/reproduce/toy.yaml")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--work-dir", default="runs/bench/train")
    ap.add_argument("--out", default="runs/bench/train.json")
    args = ap.parse_args()
    import torch

    from deepspec.evaluation.study import device_info, load_study_config
    from deepspec.precision import cpu_flags
    from deepspec.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    study = load_study_config(args.study_config)
    work = Path(args.work_dir)
    cache = small_cache(work / "cache", 96)
    seconds: dict = {d: {s: [] for s in args.settings} for d in args.drafters}
    profile = None
    for rep in range(args.repeats):
        for d in args.drafters:
            for s in args.settings:
                trainer = Trainer(stage_config(study.drafters[d], cache, work / f"run-{d}-{s}-{rep}", SETTINGS[s], study.num_anchors))
                trainer.train_step()  # warm-up: first-call allocations, DeepSpeed's lazy set-up
                t = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                seconds[d][s].append((time.perf_counter() - t) / args.steps)
                if args.profile and rep == args.repeats - 1 and s == args.settings[-1] and d == args.drafters[0]:
                    from torch.profiler import profile as torch_profile

                    with torch_profile() as prof:
                        trainer.train_step()
                    profile = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                               for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
                trainer.logger.close()
                print(f"repeat {rep}: {d} {s} {seconds[d][s][-1]:.3f} s/step", flush=True)
    best = {d: {s: min(v) for s, v in per.items()} for d, per in seconds.items()}
    first, last = args.settings[0], args.settings[-1]
    out = {**device_info(), "threads": args.threads, "cpu_bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f),
           "steps_timed": args.steps, "repeats": args.repeats, "global_batch_size": 8, "num_anchors": study.num_anchors,
           "settings": {s: SETTINGS[s] for s in args.settings}, "seconds_per_step": best, "all": seconds,
           f"speedup_{last}_over_{first}": {d: best[d][first] / best[d][last] for d in best},
           "profile_of_last_setting": profile}
    out.pop("precision")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"seconds_per_step": best, f"speedup_{last}_over_{first}": out[f"speedup_{last}_over_{first}"]}, indent=1))


if __name__ == "__main__":
    main()
