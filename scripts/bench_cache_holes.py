#!/usr/bin/env python
"""What holes in the target's cache cost a plain step: R rows of copy_edit prompts, with H masked slots appended.

    python scripts/bench_cache_holes.py [--threads 2] [--rows 8 16 32] [--holes 128 256 512] [--out runs/bench/cache_holes.json]

The batched engine's rejected drafts stay in the cache as masked slots (holes) until ``speculative._compact_holes``
moves each row's real slots together (at ``COMPACT_AT`` of the cache). Every later step copies and attends over every
slot, holes included. Here the holes are appended as one masked forward of width H after the prefill (the same slots
rejected drafts leave, all at once), then plain steps are timed; each setting is measured ``--repeats`` times,
interleaved, and the median counts. Ratios: step time with H holes / without.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench_lookup import set_prompts
from bench_setup import machine, target_config
from deepspec.decoding import speculative as S
from deepspec.decoding.verify import SamplingConfig
from deepspec.target import TargetModel, load_tokenizer


@torch.inference_mode()
def step_seconds(target, prompts: list[torch.Tensor], holes: int, steps: int) -> float:
    """Mean seconds of a plain step of the batch after ``holes`` masked slots were appended to its cache."""
    greedy = SamplingConfig(0.0)
    batch, *_ = S._prefill(target, prompts, greedy, None, 10_000, None)
    if holes:
        B = len(prompts)
        batch.mask = torch.cat([batch.mask, torch.zeros(B, holes, dtype=torch.long)], 1)
        target.decoder_with_positions(torch.zeros(B, holes, dtype=torch.long), batch.mask,
                                      batch.lengths[:, None] + torch.arange(holes), batch.cache)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            t = time.perf_counter()
        _, batch.anchors = S._plain_step(target, batch, greedy, None)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--holes", nargs="+", type=int, default=[128, 256, 512])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/cache_holes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tcfg = target_config("toy", Path("runs/bench/targets"))
    target, tok = TargetModel.from_config(tcfg), load_tokenizer(tcfg)
    pool = set_prompts(tok, "copy_edit", 32)
    rows = []
    for R in args.rows:
        prompts = [pool[i % len(pool)] for i in range(R)]
        times = {H: [] for H in [0, *args.holes]}
        for _ in range(args.repeats):
            for H in times:
                times[H].append(step_seconds(target, prompts, H, args.steps))
        base = statistics.median(times[0])
        row = {"rows": R, "cache_slots": max(len(p) for p in prompts), "step_ms": base * 1e3,
               "slowdown": {H: statistics.median(v) / base for H, v in times.items() if H}}
        rows.append(row)
        print(f"R={R:2d} ({row['cache_slots']} slots) plain step {base * 1e3:.2f} ms  "
              + "  ".join(f"+{H} holes {x:.3f}x" for H, x in row["slowdown"].items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "machine": machine(), "args": vars(args), "runs": rows,
                               "load_average_1_5_15_at_end": list(os.getloadavg())}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
