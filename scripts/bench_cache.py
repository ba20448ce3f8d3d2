#!/usr/bin/env python
"""Benchmark the target cache: bytes/token per storage dtype and format, and write throughput
relative to the target forward pass alone, measured side by side in one run.

For each repetition the forward-only pass and every (format, dtype) write path run back to back on
the same samples, so machine noise hits all of them alike; the JSON reports medians and ratios.

    python scripts/bench_cache.py                       # toy target, 64 toy prompts, CPU
    python scripts/bench_cache.py --target Qwen/Qwen3-8B --layer-ids 1 9 17 25 33 --dtype bfloat16 \
        --rows 256 --out runs/bench/cache_qwen3_8b.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deepspec.config.data import STORAGE_DTYPES, InputConfig, TargetConfig
from deepspec.data.build import ShardWriterThread, forward_batches
from deepspec.data.cache.records import RecordCodec
from deepspec.data.cache.shards import WRITERS
from deepspec.data.chat import render_sample
from deepspec.data.sources import Sample, iter_raw_rows, parse_row
from deepspec.target import TargetModel, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="toy")
    ap.add_argument("--layer-ids", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--dtype", default="float32", help="target compute dtype")
    ap.add_argument("--input", default=str(REPO / "deepspec/assets/toy_prompts/train.jsonl"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["parquet", "webdataset"])
    ap.add_argument("--out", default="runs/bench/bench_cache.json")
    args = ap.parse_args()

    tcfg = TargetConfig(name_or_path=args.target, layer_ids=args.layer_ids, dtype=args.dtype)
    tok = load_tokenizer(tcfg)
    target = TargetModel.from_config(tcfg)
    rows = [parse_row(r) for r in iter_raw_rows(InputConfig(paths=[args.input], max_rows=args.rows))]
    rendered = [render_sample(tok, s, args.max_length) for s in rows if isinstance(s, Sample)]
    tokens = sum(len(r.input_ids) for r in rendered)
    d, L = target.config.hidden_size, len(args.layer_ids)
    sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)

    def forward_only() -> float:
        t = time.perf_counter()
        for _ in forward_batches(target, rendered, args.batch_size, 0):
            pass
        sync()
        return time.perf_counter() - t

    def write_path(fmt: str, dtype: str, tmp: Path) -> tuple[float, int]:
        codec = RecordCodec(dtype, L, d)
        writer = WRITERS[fmt](tmp / f"bench-{fmt}-{dtype}", {}, rows_per_row_group=32, compression="zstd")
        thread = ShardWriterThread(writer, codec, maxsize=4)
        t = time.perf_counter()
        for items in forward_batches(target, rendered, args.batch_size, 0):
            thread.put(items)
        thread.close()
        return time.perf_counter() - t, writer.tmp.stat().st_size

    forward_only()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"forward_only": []}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            times["forward_only"].append(forward_only())
            for fmt in args.formats:
                for dtype in STORAGE_DTYPES:
                    el, size = write_path(fmt, dtype, Path(tmp))
                    times.setdefault(f"{fmt}/{dtype}", []).append(el)
                    sizes[f"{fmt}/{dtype}"] = size
    base = statistics.median(times["forward_only"])
    sup = sum(int(r.loss_mask[1:].sum()) for r in rendered) / tokens
    result = {
        "target": args.target, "device": str(target.device), "compute_dtype": args.dtype, "hidden_size": d,
        "layer_ids": args.layer_ids, "samples": len(rendered), "tokens": tokens, "supervised_fraction": sup,
        "repeats": args.repeats, "forward_only_tokens_per_s": tokens / base,
        "reference_layout_bytes_per_token": 4 + 1 + 2 * d * (L + 1),
        "by_option": {},
    }
    for key, ts in times.items():
        if key == "forward_only":
            continue
        fmt, dtype = key.split("/")
        med = statistics.median(ts)
        result["by_option"][key] = {
            "bytes_per_token_on_disk": sizes[key] / tokens,
            "bytes_per_token_formula": RecordCodec(dtype, L, d).bytes_per_token(sup),
            "tokens_per_s": tokens / med,
            "throughput_vs_forward_only": base / med,
            "seconds_median": med,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
