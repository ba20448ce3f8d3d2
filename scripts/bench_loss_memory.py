#!/usr/bin/env python
"""Peak memory of the DSpark loss (forward + backward) at a Qwen3-sized vocabulary (151,936):
chunked (deepspec's default) against the naive form that materialises every anchor's logits.

Each (variant, num_anchors) runs in a fresh subprocess so its peak is its own: peak RSS on the
CPU (ru_maxrss), peak allocated memory on CUDA. Variants alternate inside one run so machine
noise hits both alike; the JSON holds the ratios.

    python scripts/bench_loss_memory.py [--anchors 16 32 64] [--hidden 256] [--out runs/bench/loss_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 151_936


def one(naive: bool, anchors: int, hidden: int, block: int, chunk: int) -> dict:
    import torch
    from transformers import Qwen3Config

    from deepspec.drafters.blocks import make_blocks, sample_anchors
    from deepspec.drafters.dspark import DSparkConfig, DSparkDrafter
    from deepspec.config.train import LossConfig
    from deepspec.losses import block_draft_loss

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tc = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=hidden // 64,
                     num_key_value_heads=2, head_dim=64, num_hidden_layers=4)
    embed = torch.nn.Embedding(VOCAB, hidden).requires_grad_(False)
    head = torch.nn.Linear(hidden, VOCAB, bias=False)
    head.weight = embed.weight
    model = DSparkDrafter(DSparkConfig(block_size=block, num_hidden_layers=1, markov_rank=64, num_anchors=anchors,
                                       mask_token_id=5, target_layer_ids=[0, 1, 2]), tc, embed, head).to(dev)
    S = anchors + block + 64
    ids = torch.randint(0, VOCAB, (1, S), device=dev)
    mask = torch.ones(1, S, dtype=torch.uint8, device=dev)
    a, keep = sample_anchors(mask, anchors, [0])
    blocks = make_blocks(ids, mask, a, keep, block, 5)
    hidden_in, final = torch.randn(1, S, 3 * hidden, device=dev), torch.randn(1, S, hidden, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()  # resident now
    t = time.perf_counter()
    h = model(hidden_in, torch.ones(1, S, dtype=torch.bool, device=dev), blocks)
    cfg = LossConfig(chunk_blocks=10**9 if naive else chunk)
    out = block_draft_loss(model, h, blocks, final, cfg)
    out["loss"].backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - base, "seconds": time.perf_counter() - t, "loss": float(out["loss"]), "device": dev.type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=4, help="blocks per vocabulary chunk")
    ap.add_argument("--out", default="runs/bench/loss_memory.json")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "ANCHORS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0] == "naive", int(args.child[1]), args.hidden, args.block, args.chunk)))
        return
    rows = []
    for anchors in args.anchors:
        row = {"num_anchors": anchors, "logits_elements_per_tensor": anchors * args.block * VOCAB}
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--child", variant, str(anchors), "--hidden", str(args.hidden),
                   "--block", str(args.block), "--chunk", str(args.chunk)]
            # Fixed mmap threshold: freed large buffers go back to the OS, so peak RSS tracks live memory.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            row[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        row["peak_ratio_naive_over_chunked"] = row["naive"]["peak_bytes"] / row["chunked"]["peak_bytes"]
        row["same_loss"] = abs(row["naive"]["loss"] - row["chunked"]["loss"]) < 1e-4 * abs(row["naive"]["loss"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"vocab_size": VOCAB, "hidden_size": args.hidden, "block_size": args.block, "chunk_blocks": args.chunk,
              "measure": "peak minus resident memory before the loss's forward: peak RSS of a fresh process (CPU) / max_memory_allocated (CUDA)", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
