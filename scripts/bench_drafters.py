#!/usr/bin/env python
"""Train DSpark, DFlash and Eagle3 on the same cache with the same budget (optimizer steps, batch,
learning rate, seed, validation split) and write their held-out expected tau side by side.

    python scripts/bench_drafters.py --cache runs/demo/cache [--steps 300] [--out runs/bench/drafters.json]

Expected tau is the analytic acceptance length (bonus token included) on the cache's validation
split: 1 + sum_k prod_{i<=k} (1 - TV_i), TV between draft and target distributions. Each drafter
trains in its own process through the same entry point a user runs (train/train.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--target", default="toy", help="target preset (configs/target)")
    ap.add_argument("--drafters", nargs="+", default=["dspark", "dflash", "eagle3"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=2, help="backbone layers of DSpark/DFlash (Eagle3 has 1)")
    ap.add_argument("--num-anchors", type=int, default=64)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--run-root", default="runs/bench/drafters")
    ap.add_argument("--out", default="runs/bench/drafters.json")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args()

    results = {}
    for name in args.drafters:
        run_dir = Path(args.run_root) / name
        cmd = [sys.executable, str(REPO / "train" / "train.py"), f"target={args.target}", f"drafter={name}",
               f"cache_dir={args.cache}", f"run_dir={run_dir}", f"max_steps={args.steps}",
               f"global_batch_size={args.global_batch}", f"optim.lr={args.lr}", f"deepspeed.precision={args.precision}",
               "eval.val_fraction=0.1", f"eval.every_steps={max(1, args.steps // 3)}", "eval.max_samples=64",
               "checkpoint.resume=never", f"checkpoint.every_steps={args.steps}", "logging.progress=false", *args.extra]
        if name != "eagle3":
            cmd += [f"drafter.num_hidden_layers={args.layers}", f"drafter.num_anchors={args.num_anchors}"]
        t = time.time()
        subprocess.run(cmd, check=True)
        result = json.loads((run_dir / "result.json").read_text())
        results[name] = {"best_val_expected_tau": result["best_val_expected_tau"],
                         "final_val_expected_tau": result["last_eval"].get("expected_tau"),
                         "final_val_accept_rates": [result["last_eval"][k] for k in sorted(result["last_eval"]) if k.startswith("accept_rate@")],
                         "train_seconds": time.time() - t, "run_dir": str(run_dir)}
        print(name, json.dumps(results[name]), flush=True)
    ref = results.get("dspark", {}).get("final_val_expected_tau")
    summary = {"budget": {"steps": args.steps, "global_batch": args.global_batch, "lr": args.lr, "cache": args.cache},
               "drafters": results}
    if ref:
        summary["dspark_gain_over"] = {n: ref / r["final_val_expected_tau"] - 1 for n, r in results.items() if n != "dspark"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
