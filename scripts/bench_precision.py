#!/usr/bin/env python
"""Seconds per training step of the demo's DSpark drafter, per precision, on this machine.

    python scripts/bench_precision.py [--threads 2] [--steps 6] [--out runs/bench/precision.json]

Builds a small toy cache once, then for each precision (fp32, bf16) builds the trainer with the
demo's settings (drafter=dspark, global_batch_size=8, num_anchors=64) and times ``--steps``
optimizer steps after one warm-up step, in one process, precisions interleaved ``--repeats``
times (the fastest counts). It records the CPU's bf16 flags and what ``precision=auto`` picks,
so a figure can be read against the hardware that produced it.
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


def stage_config(precision: str, cache: Path, run_dir: Path):
    """The demo's DSpark settings at one precision (bench_train.py builds the stage config)."""
    from bench_train import stage_config as train_stage_config

    from deepspec.config.study import StudyDrafter

    return train_stage_config(StudyDrafter("dspark"), cache, run_dir, [f"deepspeed.precision={precision}"], anchors=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--work-dir", default="runs/bench/precision")
    ap.add_argument("--out", default="runs/bench/precision.json")
    args = ap.parse_args()
    import torch

    from bench_train import small_cache
    from deepspec.precision import cpu_flags, cpu_name, native_bf16, resolve_precision
    from deepspec.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    cache = small_cache(work / "cache", 64)
    timings: dict[str, list[float]] = {p: [] for p in args.precisions}
    for rep in range(args.repeats):
        for p in args.precisions:
            trainer = Trainer(stage_config(p, cache, work / f"run-{p}-{rep}"))
            trainer.train_step()  # warm-up: first-call allocations, DeepSpeed's lazy set-up
            t = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            timings[p].append((time.perf_counter() - t) / args.steps)
            trainer.logger.close()
            print(f"repeat {rep}: {p} {timings[p][-1]:.3f} s/step", flush=True)
    best = {p: min(v) for p, v in timings.items()}
    cpu = torch.device("cpu")
    out = {"threads": args.threads, "cpu": cpu_name(), "cpu_bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f),
           "native_bf16": native_bf16(cpu)[0], "auto_picks": resolve_precision("auto", cpu, "training"),
           "torch": torch.__version__, "steps": args.steps, "global_batch_size": 8, "drafter": "dspark (demo settings)",
           "seconds_per_step": best, "all": timings,
           "bf16_over_fp32": best["bf16"] / best["fp32"] if {"bf16", "fp32"} <= set(best) else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("cpu", "cpu_bf16_flags", "auto_picks", "seconds_per_step", "bf16_over_fp32")}))


if __name__ == "__main__":
    main()
