#!/usr/bin/env python
"""Serving throughput of the batched engine at R concurrent requests, per verification policy.

    python scripts/bench_serving.py [--drafter-path runs/x/export] [--threads 2] [--out runs/bench/serving.json]

Real generations through the batched loop (not a replay), the same prompts and seeds for every
policy, in one process. Each figure is a sum over interleaved runs, never a single run: ``--repeats``
sweeps over every policy (the order reversed every other sweep, so drift hits every policy alike),
throughput = tokens / seconds summed over the sweeps. A 3% criterion needs more than that on a
noisy machine (at 1-2 rows three sweeps have put fixed_g3 anywhere between 0.75x and 1.08x plain), so
plain, the sweeps' best fixed length and scheduled_with_draft_cost then run in interleaved groups of three
(same prompts and seed within a group, every order of the three in turn; at R <= 4 each group takes the
next R prompts of a pool of 16) until each arm has run ``--paired-seconds`` (and at least
``--paired-repeats`` groups: at 32 rows 60 s is only ~13): ``vs_plain_paired`` and ``vs_best_fixed_paired``
are ratios of summed throughputs, with the per-group ratios, their spread and standard errors
(``*_paired_se``: their standard deviation / sqrt(groups)) beside them. On a VM whose groups spread +-30% (stalls of seconds) that
still resolves only a few percent, so the draft-cost runs of the pairs also account for their own
rounds: ``vs_plain_in_process`` = 1 - (what the drafted rounds cost beyond what plain steps of the same
run, at the same R, would have taken for their tokens) / the run's seconds. It is the gate's decisions
measured against plain decoding interleaved round by round; it leaves out any difference between a
plain round of the loop and a step of ``autoregressive_generate_batch`` (the paired ratio includes it).

``--proposers`` compares the training-free lookup with the drafter instead (``deepspec.decoding.hybrid``; at T > 0 EOS
is ignored, so every arm emits the same number of tokens whatever it sampled): at each
load, groups of plain, lookup, drafter (draft-cost gate), lookup_rule (Arctic's fixed rule) and hybrid, interleaved in a
rotating order on the same prompts and seed (``--prompt-set``: a file of ``deepspec/assets/eval_prompts``, its rows
cycled to fill R; ``--proposer-arms`` restricts the arms), until each arm has run ``--paired-seconds``; ratios of summed throughputs, hybrid's per-group ratios
beside them, end to end and after the prefill (``decode_*``: the prefill is the same computation in every arm, and at 8+
long prompts its time alone varies +-20% here, which hides what the proposer changes; serving benchmarks report time
per output token for the same reason), and ``in_process``: each arm's drafted rounds priced against its own plain
rounds. transformers' prompt lookup decodes one sequence at a time (assisted generation has no batch), so it is in
``scripts/bench_lookup.py`` (batch 1) only. ``--ablate-compaction`` adds lookup and hybrid arms whose target cache keeps
its holes (``speculative.COMPACT_AT`` off), in the same groups.

The verify cost profile is measured once at start-up on this machine (cached per target, device,
dtype and thread count) and used by both scheduled policies.
"""
from __future__ import annotations

import argparse
import json
import os
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


def log_rounds(scheduler: VerifyScheduler) -> list[tuple[int, bool, int, float]]:
    """Record every round ``scheduler`` observes (any scheduler class): (rows, drafted, tokens, seconds) per round."""
    rounds, observe = [], scheduler.observe

    def logged(rows, verified, accepted, seconds):
        drafted = verified is not None
        rounds.append((len(rows), drafted, len(rows) + (int(accepted.sum()) if drafted else 0), seconds))
        observe(rows, verified, accepted, seconds)
    scheduler.observe = logged
    return rounds


def drafting_account(rounds: list[tuple[int, bool, int, float]]) -> dict:
    """What drafted rounds cost beyond plain steps of the same run at the same R (median seconds per token)."""
    per_token = {}
    for R in {r[0] for r in rounds}:
        plain = [sec / tokens for n, drafted, tokens, sec in rounds if n == R and not drafted]
        if plain:
            per_token[R] = statistics.median(plain)
    drafted = [(n, tokens, sec) for n, d, tokens, sec in rounds if d]
    priced = [(n, tokens, sec) for n, tokens, sec in drafted if n in per_token]
    loss = sum(sec - tokens * per_token[n] for n, tokens, sec in priced)
    total = sum(r[3] for r in rounds)
    return {"vs_plain_in_process": 1 - loss / total, "drafted_rounds": len(drafted), "drafted_rounds_unpriced": len(drafted) - len(priced),
            "drafted_seconds_share": sum(sec for _, _, sec in drafted) / total, "drafting_loss_share": loss / total}


PROPOSER_ARMS = {"lookup": "lookup", "drafter": "scheduled_with_draft_cost", "lookup_rule": "lookup_rule", "hybrid": "hybrid"}


def proposer_sweep(args, target, tok, drafter, cost, temps) -> list[dict]:
    """Plain, lookup, drafter, lookup_rule and hybrid at each load: paired groups, rotating order (``--proposers``)."""
    from bench_lookup import hybrid_over_best, hybrid_over_held_out_best, set_prompts
    from deepspec.decoding.hybrid import make_engine_session, make_scheduler
    from deepspec.evaluation.harness import token_sources

    from deepspec.decoding import speculative

    g, V, sampling = drafter.cfg.block_size, target.config.vocab_size, SamplingConfig(args.temperature)
    eos = tok.eos_token_id if args.temperature == 0 else None  # T > 0: ignore_eos, every arm emits R x max_new_tokens
    compact_at = speculative.COMPACT_AT
    pool = set_prompts(tok, args.prompt_set, 32)
    policies = {arm: p for arm, p in PROPOSER_ARMS.items() if arm in args.proposer_arms or arm == "hybrid"}
    if args.ablate_compaction:  # the same policies on a cache whose holes are never compacted
        policies |= {f"{arm}_uncompacted": PROPOSER_ARMS[arm] for arm in ("lookup", "hybrid")}
    scheds = {arm: make_scheduler(ScheduleConfig(policy=p), g, cost, temps) for arm, p in policies.items()}
    arms, loads = ["plain", *policies] if "plain" in args.proposer_arms else [*policies], []
    logs = {arm: log_rounds(s) for arm, s in scheds.items()}
    for R in args.loads:
        batch = [pool[i % len(pool)] for i in range(R)]
        paired, groups, sources = {arm: [0, 0.0, 0.0] for arm in arms}, [], {arm: {} for arm in policies}  # tokens, s, decode s
        for log in logs.values():
            log.clear()
        while len(groups) < args.paired_repeats or min(v[1] for v in paired.values()) < args.paired_seconds:
            k, group = len(groups), {}  # each arm's (tokens, seconds, decoding seconds)
            for arm in arms[k % len(arms):] + arms[: k % len(arms)]:
                gen, t = torch.Generator().manual_seed(k), time.perf_counter()
                if arm == "plain":
                    res = autoregressive_generate_batch(target, batch, args.max_new_tokens, sampling, eos, gen)
                else:
                    s = scheds[arm]
                    speculative.COMPACT_AT = float("inf") if arm.endswith("_uncompacted") else compact_at
                    res = speculative_generate_batch(target, make_engine_session(s, drafter, R, V), batch, args.max_new_tokens,
                                                     sampling, eos, gen, s)
                    speculative.COMPACT_AT = compact_at
                    for src, n in token_sources(res).items():
                        sources[arm][src] = sources[arm].get(src, 0) + n
                sec, tokens = time.perf_counter() - t, sum(len(r.tokens) for r in res)
                decoding = sec - res[0].seconds["prefill"]  # the rows share one seconds dict (the batch's wall time)
                paired[arm][0] += tokens
                paired[arm][1] += sec
                paired[arm][2] += decoding
                group[arm] = (tokens, sec, decoding)
            groups.append(group)
        thr = {arm: tokens / sec for arm, (tokens, sec, _) in paired.items()}
        dec = {arm: tokens / sec for arm, (tokens, _, sec) in paired.items()}
        row = {"concurrent_requests": R, "groups": len(groups), "throughput_tokens_per_s": thr,
               "vs_plain": {arm: thr[arm] / thr["plain"] for arm in arms} if "plain" in thr else None,
               "seconds": {arm: sec for arm, (_, sec, _) in paired.items()},
               # after the prefill (the same computation in every arm, whose time varies +-20% here at 8+ long prompts):
               # what a proposer changes, as serving benchmarks' time per output token does
               "decode_tokens_per_s": dec, "decode_vs_plain": {arm: dec[arm] / dec["plain"] for arm in arms} if "plain" in dec else None,
               "prefill_seconds_share": {arm: 1 - d / sec for arm, (_, sec, d) in paired.items()},
               # per arm, its drafted (lookup or drafter) rounds priced against plain rounds of the same runs at the same
               # R: the decisions' gain or loss, free of the prefill and of run-to-run noise
               "in_process": {arm: drafting_account(log) for arm, log in logs.items()},
               "token_shares": {arm: {k: v / max(sum(c.values()), 1) for k, v in c.items()} for arm, c in sources.items()}}
        for key, table, i in (("hybrid_vs_best_single", thr, 1), ("hybrid_decode_vs_best_single", dec, 2)):
            timed = [{arm: (v[0], v[i]) for arm, v in grp.items()} for grp in groups]  # (tokens, seconds) per arm
            per_group = [hybrid_over_best({arm: t / sec for arm, (t, sec) in grp.items()}) for grp in timed]
            row[key] = hybrid_over_best(table)
            row[key + "_per_group"] = per_group
            row[key + "_se"] = statistics.stdev(per_group) / len(per_group) ** 0.5 if len(per_group) > 1 else None
            row[key.replace("best", "held_out_best")] = hybrid_over_held_out_best(timed)
        row["groups"] = [{arm: list(v) for arm, v in grp.items()} for grp in groups]  # (tokens, seconds, decoding seconds)
        loads.append(row)
        print(f"R={R:3d} ({len(groups)} groups)  decoding tokens/s: " + "  ".join(f"{a} {dec[a]:.1f}" for a in arms) +
              f"  | hybrid / best single {row['hybrid_vs_best_single']:.3f}, decoding {row['hybrid_decode_vs_best_single']:.3f}"
              f" (se {row['hybrid_decode_vs_best_single_se'] or 0:.3f}; held-out best {row['hybrid_decode_vs_held_out_best_single'] or 0:.3f})"
              f"  | in process vs plain: "
              + " ".join(f"{a} {v['vs_plain_in_process']:.3f}" for a, v in row["in_process"].items()) + "  | hybrid shares "
              + " ".join(f"{k} {v:.2f}" for k, v in row["token_shares"]["hybrid"].items()), flush=True)
    return loads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="toy")
    ap.add_argument("--drafter", default="dspark")
    ap.add_argument("--drafter-path", default=None, help="an exported drafter (else a random one)")
    ap.add_argument("--loads", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved sweeps over every policy per load (summed)")
    ap.add_argument("--paired-repeats", type=int, default=6, help="at least this many groups (plain, best fixed, draft-cost) per load")
    ap.add_argument("--paired-seconds", type=float, default=10.0,
                    help="and groups until each arm has run this long: the paired ratios sum over them")
    ap.add_argument("--calibration-prompts", type=int, default=12, help="STS fit when the export has no temperatures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--proposers", action="store_true", help="lookup / drafter / hybrid at each load instead of the fixed lengths")
    ap.add_argument("--prompt-set", default="copy_edit", help="--proposers: a set of deepspec/assets/eval_prompts")
    ap.add_argument("--proposer-arms", nargs="+", default=["plain", *PROPOSER_ARMS], choices=["plain", *PROPOSER_ARMS],
                    help="--proposers: the arms to run (hybrid always; hybrid / best single is over the single arms run)")
    ap.add_argument("--ablate-compaction", action="store_true",
                    help="--proposers: also lookup and hybrid on a cache whose holes are never compacted (_uncompacted arms)")
    ap.add_argument("--work-dir", default="runs/bench/targets")
    ap.add_argument("--out", default="runs/bench/serving.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tcfg = target_config(args.target, Path(args.work_dir))
    target, tok = TargetModel.from_config(tcfg), load_tokenizer(tcfg)
    drafter = build_drafter(args.drafter, tcfg, args.drafter_path)
    g = make_session(drafter, 1).block_size
    lookup_width = ScheduleConfig().lookup_tokens + 1 if args.proposers else 0
    cost = VerifyCostModel.load_or_profile(target, max_rows=max(args.loads), max_width=max(g + 1, lookup_width))
    temps = getattr(drafter, "confidence_temperatures", None)
    if args.proposers:  # the drafter's own confidences are not read by these policies' gates (online acceptance)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        loads = proposer_sweep(args, target, tok, drafter, cost, temps)
        out.write_text(json.dumps({"threads": args.threads, "machine": machine(), "load_average_1_5_15_at_end": list(os.getloadavg()),
                                   "seconds": time.time() - t0, "args": vars(args), "block": g,
                                   "trained_drafter": bool(args.drafter_path), "loads": loads}, indent=1))
        print(f"wrote {out} in {time.time() - t0:.0f} s")
        return
    if temps is None:  # fit STS on a calibration split of the held-out prompts (never used for the loads below)
        temps = fit_sts(target, drafter, prompts(tok, args.calibration_prompts, offset=200), 64, SamplingConfig(args.temperature))
        print("STS temperatures fitted on", args.calibration_prompts, "calibration prompts:", [round(t, 2) for t in temps])
    sampling = SamplingConfig(temperature=args.temperature)
    policies = {"plain": None, **{f"fixed_g{L}": ScheduleConfig(policy="fixed", fixed_length=L) for L in range(1, g + 1)},
                "scheduled": ScheduleConfig(policy="scheduled"),
                "scheduled_with_draft_cost": ScheduleConfig(policy="scheduled_with_draft_cost")}
    schedulers = {k: VerifyScheduler(c, g, cost, temps) for k, c in policies.items() if c is not None}
    gated_rounds = log_rounds(schedulers["scheduled_with_draft_cost"])
    speculative_generate_batch(target, make_session(drafter, 1), prompts(tok, 1), 8, sampling)  # warm-up
    loads = []
    pool = prompts(tok, 16, offset=0)
    for R in args.loads:
        ps = prompts(tok, R, offset=0)

        def run(name: str, seed: int, batch: list[torch.Tensor]) -> tuple[list, float]:
            gen = torch.Generator().manual_seed(seed)
            t = time.perf_counter()
            if name == "plain":
                res = autoregressive_generate_batch(target, batch, args.max_new_tokens, sampling, None, gen)
            else:
                res = speculative_generate_batch(target, make_session(drafter, R), batch, args.max_new_tokens, sampling, None,
                                                 gen, schedulers[name])
            return res, time.perf_counter() - t

        total = {name: {"seconds": 0.0, "tokens": 0, "rounds": 0, "drafted_rounds": 0, "verified": 0} for name in policies}
        for rep in range(args.repeats):  # interleaved sweeps, order reversed every other one
            for name in (list(policies) if rep % 2 == 0 else list(policies)[::-1]):
                res, sec = run(name, rep, ps)
                tot = total[name]
                tot["seconds"] += sec
                tot["tokens"] += sum(len(r.tokens) for r in res)
                rounds = [L for r in res for L in r.verified_per_round]  # per row and round
                tot["rounds"] += len(rounds)
                tot["drafted_rounds"] += sum(1 for L in rounds if L > 0) if name != "plain" else 0
                tot["verified"] += sum(rounds) if name != "plain" else 0
        summed = {name: {"throughput_tokens_per_s": t["tokens"] / t["seconds"], "seconds": t["seconds"], "tokens": t["tokens"],
                       "runs": args.repeats, "rounds_per_request": t["rounds"] / (R * args.repeats) or args.max_new_tokens,
                       "drafted_round_fraction": t["drafted_rounds"] / max(t["rounds"], 1),
                       "mean_verified": t["verified"] / max(t["rounds"], 1)} for name, t in total.items()}
        fixed = {k: v for k, v in summed.items() if k.startswith("fixed_g")}
        top = max(fixed, key=lambda k: fixed[k]["throughput_tokens_per_s"])
        arms = ["plain", top, "scheduled_with_draft_cost"]
        pairs, pairs_best, paired = [], [], {name: [0, 0.0] for name in arms}  # per group ratios; tokens, seconds
        gated_rounds.clear()
        while len(pairs) < args.paired_repeats or min(v[1] for v in paired.values()) < args.paired_seconds:
            k = len(pairs)
            batch = [pool[(k * R + i) % len(pool)] for i in range(R)] if R <= 4 else ps
            order = (arms[k % 3:] + arms[: k % 3])[:: 1 if k // 3 % 2 == 0 else -1]  # all 6 orders every 6 groups
            rate = {}
            for name in order:
                res, sec = run(name, args.repeats + k, batch)
                tokens = sum(len(r.tokens) for r in res)
                paired[name][0] += tokens
                paired[name][1] += sec
                rate[name] = tokens / sec
            pairs.append(rate["scheduled_with_draft_cost"] / rate["plain"])
            pairs_best.append(rate["scheduled_with_draft_cost"] / rate[top])
        row = {"concurrent_requests": R, **summed, "fixed_g7": summed.get("fixed_g7", summed[f"fixed_g{g}"]),
               "best_fixed": {**fixed[top], "policy": top}}
        for k in ("scheduled", "scheduled_with_draft_cost"):
            row[k]["vs_best_fixed"] = row[k]["throughput_tokens_per_s"] / row["best_fixed"]["throughput_tokens_per_s"]
            row[k]["vs_plain"] = row[k]["throughput_tokens_per_s"] / row["plain"]["throughput_tokens_per_s"]
        rate = {name: tokens / sec for name, (tokens, sec) in paired.items()}
        row["scheduled_with_draft_cost"].update(
            vs_plain_paired=rate["scheduled_with_draft_cost"] / rate["plain"],
            vs_best_fixed_paired=rate["scheduled_with_draft_cost"] / rate[top], paired_best_fixed=top,
            paired_runs=len(pairs), paired_seconds={name: sec for name, (_, sec) in paired.items()},
            vs_plain_pair_median=statistics.median(pairs), vs_plain_pair_min=min(pairs), vs_plain_pair_max=max(pairs),
            # about one standard error of each paired figure: the spread of the group ratios / sqrt(groups)
            vs_plain_paired_se=statistics.stdev(pairs) / len(pairs) ** 0.5, vs_plain_pairs=pairs,
            vs_best_fixed_paired_se=statistics.stdev(pairs_best) / len(pairs) ** 0.5, vs_best_fixed_pairs=pairs_best,
            **drafting_account(gated_rounds))
        loads.append(row)
        sd = row["scheduled_with_draft_cost"]
        print(f"R={R:3d}  tokens/s  plain {summed['plain']['throughput_tokens_per_s']:8.1f}  fixed_g{g} "
              f"{row['fixed_g7']['throughput_tokens_per_s']:8.1f}  best_fixed({top}) {fixed[top]['throughput_tokens_per_s']:8.1f}  "
              f"scheduled {row['scheduled']['throughput_tokens_per_s']:8.1f}  +draft_cost {sd['throughput_tokens_per_s']:8.1f}  "
              f"(sweeps: vs best_fixed {sd['vs_best_fixed']:.3f}, vs plain {sd['vs_plain']:.3f}; over {len(pairs)} groups: "
              f"vs plain {sd['vs_plain_paired']:.3f} +- {sd['vs_plain_paired_se']:.3f} [{min(pairs):.2f}-{max(pairs):.2f}], "
              f"vs {top} {sd['vs_best_fixed_paired']:.3f} +- {sd['vs_best_fixed_paired_se']:.3f}; in-process {sd['vs_plain_in_process']:.3f}, "
              f"drafted {sd['drafted_round_fraction']:.3f})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "machine": machine(), "seconds": time.time() - t0, "args": vars(args),
                               "block": g, "sts_temperatures": temps, "verify_cost_ms": {
                                   str(r): [1e3 * s for s in line] for r, line in zip(cost.rows, cost.seconds)},
                               "loads": loads}, indent=1))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
