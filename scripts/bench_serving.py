#!/usr/bin/env python
"""Serving throughput of the batched engine at R concurrent requests, per verification policy.

    python scripts/bench_serving.py [--drafter-path runs/x/export] [--threads 2] [--out runs/bench/serving.json]

Real generations through the batched loop (not a replay), the same prompts for every policy, in
one process, policies interleaved and each run ``--repeats`` times (the fastest counts). On a
noisy machine that is not enough to see a few percent, so plain and scheduled_with_draft_cost are
then run ``--paired-repeats`` more times alternately, and the median of their paired ratios is
reported (``vs_plain_paired_median``, with min and max):

    plain                      autoregressive decoding of the R requests as one batch
    fixed_g<L>                 draft every round, verify the first L drafts of every row (L = 1..g)
    best_fixed                 the fastest fixed L at this load (what a tuned static config gets)
    scheduled                  Algorithm 1 on STS-calibrated confidences with the profiled verify cost
    scheduled_with_draft_cost  + the draft's own cost and the plain-decoding gate

The verify cost profile is measured once at start-up on this machine (cached per target, device,
dtype and thread count) and used by both scheduled policies.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_setup import build_drafter, machine, prompts, target_config
from deepspec.config.decoding import ScheduleConfig
from deepspec.decoding.scheduler import VerifyCostModel, VerifyScheduler
from deepspec.decoding.sessions import make_session
from deepspec.decoding.speculative import autoregressive_generate_batch, speculative_generate_batch
from deepspec.decoding.verify import SamplingConfig
from deepspec.evaluation.harness import fit_sts
from deepspec.target import TargetModel, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="toy")
    ap.add_argument("--drafter", default="dspark")
    ap.add_argument("--drafter-path", default=None, help="an exported drafter (else a random one)")
    ap.add_argument("--loads", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--paired-repeats", type=int, default=7,
                    help="extra alternating runs of plain and scheduled_with_draft_cost per load: their ratio's median")
    ap.add_argument("--calibration-prompts", type=int, default=12, help="STS fit when the export has no temperatures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default="runs/bench/targets")
    ap.add_argument("--out", default="runs/bench/serving.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tcfg = target_config(args.target, Path(args.work_dir))
    target, tok = TargetModel.from_config(tcfg), load_tokenizer(tcfg)
    drafter = build_drafter(args.drafter, tcfg, args.drafter_path)
    g = make_session(drafter, 1).block_size
    cost = VerifyCostModel.load_or_profile(target, max_rows=max(args.loads), max_width=g + 1)
    temps = getattr(drafter, "confidence_temperatures", None)
    if temps is None:  # fit STS on a calibration split of the held-out prompts (never used for the loads below)
        temps = fit_sts(target, drafter, prompts(tok, args.calibration_prompts, offset=200), 64, SamplingConfig(args.temperature))
        print("STS temperatures fitted on", args.calibration_prompts, "calibration prompts:", [round(t, 2) for t in temps])
    sampling = SamplingConfig(temperature=args.temperature)
    policies = {"plain": None, **{f"fixed_g{L}": ScheduleConfig(policy="fixed", fixed_length=L) for L in range(1, g + 1)},
                "scheduled": ScheduleConfig(policy="scheduled"),
                "scheduled_with_draft_cost": ScheduleConfig(policy="scheduled_with_draft_cost")}
    schedulers = {k: VerifyScheduler(c, g, cost, temps) for k, c in policies.items() if c is not None}
    speculative_generate_batch(target, make_session(drafter, 1), prompts(tok, 1), 8, sampling)  # warm-up
    loads = []
    for R in args.loads:
        ps = prompts(tok, R, offset=0)
        best: dict[str, dict] = {}

        def run(name: str, seed: int):
            gen = torch.Generator().manual_seed(seed)
            t = time.perf_counter()
            if name == "plain":
                res = autoregressive_generate_batch(target, ps, args.max_new_tokens, sampling, None, gen)
            else:
                res = speculative_generate_batch(target, make_session(drafter, R), ps, args.max_new_tokens, sampling, None,
                                                 gen, schedulers[name])
            return res, time.perf_counter() - t

        for rep in range(args.repeats):
            for name in policies:
                res, sec = run(name, rep)
                tokens = sum(len(r.tokens) for r in res)
                rounds = sum(len(r.emitted_per_round) for r in res) / R
                entry = {"throughput_tokens_per_s": tokens / sec, "seconds": sec, "tokens": tokens,
                         "rounds_per_request": rounds or args.max_new_tokens,
                         "drafted_round_fraction": (sum(sum(1 for L in r.verified_per_round if L > 0) for r in res) /
                                                    max(sum(len(r.verified_per_round) for r in res), 1)) if name != "plain" else 0.0,
                         "mean_verified": (sum(sum(r.verified_per_round) for r in res) /
                                           max(sum(len(r.verified_per_round) for r in res), 1)) if name != "plain" else 0.0}
                if name not in best or entry["seconds"] < best[name]["seconds"]:
                    best[name] = entry
        ratios = []  # paired: plain then scheduled_with_draft_cost on the same seed, alternating order
        for rep in range(args.paired_repeats):
            order = ["plain", "scheduled_with_draft_cost"][:: 1 if rep % 2 == 0 else -1]
            out = {name: run(name, args.repeats + rep) for name in order}
            rate = {name: sum(len(r.tokens) for r in res) / sec for name, (res, sec) in out.items()}
            ratios.append(rate["scheduled_with_draft_cost"] / rate["plain"])
        fixed = {k: v for k, v in best.items() if k.startswith("fixed_g")}
        top = max(fixed, key=lambda k: fixed[k]["throughput_tokens_per_s"])
        row = {"concurrent_requests": R, **best, "fixed_g7": best.get("fixed_g7", best[f"fixed_g{g}"]),
               "best_fixed": {**fixed[top], "policy": top}}
        for k in ("scheduled", "scheduled_with_draft_cost"):
            row[k]["vs_best_fixed"] = row[k]["throughput_tokens_per_s"] / row["best_fixed"]["throughput_tokens_per_s"]
            row[k]["vs_plain"] = row[k]["throughput_tokens_per_s"] / row["plain"]["throughput_tokens_per_s"]
        if ratios:
            row["scheduled_with_draft_cost"].update(vs_plain_paired_median=statistics.median(ratios),
                                                    vs_plain_paired_min=min(ratios), vs_plain_paired_max=max(ratios))
        loads.append(row)
        print(f"R={R:3d}  tokens/s  plain {best['plain']['throughput_tokens_per_s']:8.1f}  fixed_g{g} "
              f"{row['fixed_g7']['throughput_tokens_per_s']:8.1f}  best_fixed({top}) {fixed[top]['throughput_tokens_per_s']:8.1f}  "
              f"scheduled {row['scheduled']['throughput_tokens_per_s']:8.1f}  +draft_cost "
              f"{row['scheduled_with_draft_cost']['throughput_tokens_per_s']:8.1f}  "
              f"(vs best_fixed {row['scheduled_with_draft_cost']['vs_best_fixed']:.2f}, vs plain "
              f"{row['scheduled_with_draft_cost']['vs_plain']:.2f}, paired median "
              f"{row['scheduled_with_draft_cost'].get('vs_plain_paired_median', float('nan')):.2f}, "
              f"drafted {row['scheduled_with_draft_cost']['drafted_round_fraction']:.2f})",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "machine": machine(), "seconds": time.time() - t0, "args": vars(args),
                               "block": g, "sts_temperatures": temps, "verify_cost_ms": {
                                   str(r): [1e3 * s for s in line] for r, line in zip(cost.rows, cost.seconds)},
                               "loads": loads}, indent=1))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
