#!/usr/bin/env python
"""Where a decoding round's time goes, and how close the loop gets to its physical bound.

    python scripts/bench_decoding.py [--threads 2] [--targets toy qwen3-30m qwen3-100m qwen3-400m]
        [--drafter-path dspark=runs/x/export ...] [--out runs/bench/decoding.json]

Per target, drafter (DSpark, DFlash, Eagle3; fixed verification of the whole block) and
temperature (0, 1), on the same held-out prompts, in one process, interleaved prompt by prompt:

    speedup          speculative tokens/s / plain tokens/s                    (wall clock, same prompts)
    decode_speedup   the same without the prefill (identical on both sides): the loop's own speedup
    tau              tokens emitted per round
    ideal_speedup    tau * t_step / t_verify(g+1)     what the loop would reach if drafting and
                                                      bookkeeping were free: t_step = the plain runs'
                                                      time per decoded token, t_verify = the loop's own
                                                      verify time per round, both timed in the same
                                                      interleaved runs (so machine drift cancels)
    loop_efficiency  decode_speedup / ideal_speedup
    ideal_speedup_profiled, loop_efficiency_profiled: the same with t_step and t_verify from a separate
                     best-of-5 profile before the runs (VerifyCostModel): moved up to 15% between two
                     runs of the same code on a shared VM, more than the changes it was meant to show
    *_share          a round's wall time split: draft / verify / overhead (schedule, acceptance, bookkeeping)

plus the draft's cost in target decode steps at 100 / 400 / 1,000 tokens of context (it must not
grow with the context: the drafter's state is incremental; a step is the forward and the next token's
logits, as in plain decoding, timed alternately with the draft, median of 15 each), and HF ``generate`` baselines at T=0
(plain, prompt lookup, assisted generation with a one-layer draft model) on the same prompts.
Random targets come with random drafters (tau ~ 1): they measure cost at a model shape, not acceptance.

Hybrid targets (``qwen3_5-30m``: gated delta-net layers with recurrent states) add the rollback's cost: per verify
width, the verify with per-position states kept and each row's state selected vs the same forward without, timed
alternately (``rollback``), and per run the rollback's share of the loop (``rollback_share``: the selection, timed in
the real rounds, plus the verify's extra for its per-position states at the run's width).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_setup import build_drafter, machine, prompts, target_config
from deepspec.decoding.scheduler import VerifyCostModel
from deepspec.decoding.sessions import make_session
from deepspec.decoding.speculative import autoregressive_generate, speculative_generate
from deepspec.decoding.target_cache import TargetCache
from deepspec.decoding.verify import SamplingConfig
from deepspec.target import TargetModel, load_tokenizer


def interleaved_medians(fns: dict, repeats: int = 15) -> dict:
    """Median seconds of each function, called in turn (a, b, a, b, ...): drift on a shared machine hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


@torch.inference_mode()
def draft_cost_in_steps(target, drafter, contexts=(100, 400, 1000)) -> dict:
    """Steady-state draft (g+1 new tokens appended, then one block) / one target decode step (the forward and the
    next token's logits, as plain decoding's step), at each context, timed alternately."""
    F = sum(1 for _ in target.layer_ids) * target.config.hidden_size
    out = {}
    for n in contexts:
        cache = TargetCache(target.config)
        target(torch.zeros(1, n, dtype=torch.long), past_key_values=cache)

        def step():  # a hybrid target's recurrent states move on (no rollback in plain decoding): the same cost
            _, final = target(torch.ones(1, 1, dtype=torch.long), past_key_values=cache)
            target.logits(final[:, -1])
            cache.drop_slots(1)

        session = make_session(drafter, 1)
        session.extend(torch.randn(1, n, F), torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.bool))
        g = session.block_size

        def draft():
            session.extend(torch.randn(1, 3, F), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
            session.draft(torch.tensor([0]), torch.tensor([5]), SamplingConfig(1.0), None)

        draft()
        t = interleaved_medians({"step": step, "draft": draft})
        out[str(n)] = {"draft_ms": 1e3 * t["draft"], "step_ms": 1e3 * t["step"], "draft_in_target_steps": t["draft"] / t["step"],
                       "block": g}
    return out


@torch.inference_mode()
def rollback_cost(target, widths: list[int], context: int) -> dict:
    """A hybrid target's verify of W tokens with per-position states kept and each row's state selected (the engine's
    rollback) vs the same forward without (transformers' chunked form, which could not roll back), alternately timed;
    ``keep_ms`` is the selection alone. Per W: ms of each and the rollback's extra as a share of the verify."""
    out = {}
    for W in widths:
        plain_cache, kept_cache = TargetCache(target.config), TargetCache(target.config)
        for c in (plain_cache, kept_cache):
            target(torch.zeros(1, context, dtype=torch.long), past_key_values=c)
        kept_cache.record(W)
        ids, none_kept, keep_s = torch.ones(1, W, dtype=torch.long), torch.zeros(1, dtype=torch.long), []

        def without():
            target(ids, past_key_values=plain_cache)
            plain_cache.drop_slots(W)

        def with_rollback():
            target(ids, past_key_values=kept_cache)
            t = time.perf_counter()
            kept_cache.keep_prefix(none_kept)
            keep_s.append(time.perf_counter() - t)
            kept_cache.drop_slots(W)

        t = interleaved_medians({"without": without, "with": with_rollback})
        out[str(W)] = {"verify_ms_without_rollback": 1e3 * t["without"], "verify_ms_with_rollback": 1e3 * t["with"],
                       "keep_ms": 1e3 * sorted(keep_s)[len(keep_s) // 2],
                       "rollback_share_of_verify": 1 - t["without"] / t["with"]}
    return out


class KeepTimer:
    """Wall time of every ``TargetCache.keep_prefix`` call while installed (the rollback's share of real rounds)."""

    def __enter__(self):
        self.seconds, self.calls, original = 0.0, 0, TargetCache.keep_prefix

        def timed(cache, kept):
            t = time.perf_counter()
            original(cache, kept)
            self.seconds += time.perf_counter() - t
            self.calls += 1

        self.original, TargetCache.keep_prefix = original, timed
        return self

    def __exit__(self, *exc):
        TargetCache.keep_prefix = self.original


def hf_baselines(target, tok, ps, max_new: int, plain_tokens_per_s: float) -> dict:
    """transformers' generate at T=0: plain, prompt lookup, and assisted by a one-layer model that
    shares the target's embedding, first layer and final norm (a small draft model of the same vocabulary).
    A hybrid target has no assisted baseline: its first layer is linear attention, and transformers' masks need
    an attention layer in the model."""
    from transformers import AutoModelForCausalLM

    model = target.model
    methods = [("hf_plain", {}), ("hf_prompt_lookup", {"prompt_lookup_num_tokens": 7})]
    if not TargetCache(model.config).has_recurrent_layers:
        small_cfg = type(model.config).from_dict({**model.config.to_dict(), "num_hidden_layers": 1, "layer_types": ["full_attention"]})
        assistant = AutoModelForCausalLM.from_config(small_cfg).eval()
        assistant.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
        assistant.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
        assistant.model.norm.load_state_dict(model.model.norm.state_dict())
        assistant.tie_weights()
        methods.append(("hf_assisted_1layer", {"assistant_model": assistant}))
    out = {}
    for name, extra in methods:
        kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None, **extra)
        model.generate(ps[0][None], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        tokens, t = 0, time.perf_counter()
        for p in ps:
            gen = model.generate(p[None], max_new_tokens=max_new, min_new_tokens=max_new, **kw)
            tokens += gen.shape[1] - p.shape[0]
        sec = time.perf_counter() - t
        out[name] = {"tokens_per_s": tokens / sec, "speedup_vs_plain": tokens / sec / plain_tokens_per_s}
    return out


def run_target(name: str, args, drafter_paths: dict) -> tuple[list[dict], dict]:
    tcfg = target_config(name, Path(args.work_dir))
    target, tok = TargetModel.from_config(tcfg), load_tokenizer(tcfg)
    n_params = sum(p.numel() for p in target.model.parameters())
    big = n_params > 2e8
    n_prompts, max_new = (2, 24) if big else (args.prompts, args.max_new_tokens)
    ps = prompts(tok, n_prompts)
    drafters = {d: build_drafter(d, tcfg, drafter_paths.get(d) if name == "toy" else None, layers=args.layers,
                                 block=args.block, rank=args.markov_rank) for d in args.drafters}
    if name == "toy":  # extra trained variants, e.g. dspark-r32=runs/x/best (the kind is the name's first word)
        drafters.update({n: build_drafter(n.split("-")[0], tcfg, p) for n, p in drafter_paths.items() if n not in drafters})
    g = max(make_session(d, 1).block_size for d in drafters.values())
    context = int(sum(len(p) for p in ps) / len(ps) + max_new / 2)
    cost = VerifyCostModel.profile(target, max_rows=1, max_width=g + 1, context=context, repeats=5)
    runs, extra = [], {"target": name, "parameters": n_params, "prompts": n_prompts, "max_new_tokens": max_new,
                       "profile_context_tokens": context, "t_step_ms": 1e3 * cost(1, 1),
                       "t_verify_ms_by_width": {str(w): 1e3 * cost(1, w) for w in range(1, g + 2)}, "draft_cost": {}}
    for dname, drafter in drafters.items():
        extra["draft_cost"][dname] = draft_cost_in_steps(target, drafter)
    hybrid = TargetCache(target.config).has_recurrent_layers
    if hybrid:
        extra["rollback"] = rollback_cost(target, sorted({1, (g + 1) // 2 + 1, g + 1}), context)
    for T in args.temperatures:
        sampling = SamplingConfig(temperature=T)
        autoregressive_generate(target, ps[0], 8, sampling)  # warm-up
        for d in drafters.values():
            speculative_generate(target, d, ps[0], 8, sampling)
        plain = {"tokens": 0, "seconds": 0.0, "prefill": 0.0}
        spec = {d: {"tokens": 0, "wall": 0.0, "rounds": 0, "emitted": 0, "parts": {}, "keep": 0.0} for d in drafters}
        for i, p in enumerate(ps):  # interleaved: drift on a noisy machine hits every method alike
            t = time.perf_counter()
            r = autoregressive_generate(target, p, max_new, sampling, None, torch.Generator().manual_seed(i))
            plain["seconds"] += time.perf_counter() - t
            plain["tokens"] += len(r.tokens)
            plain["prefill"] += r.seconds["prefill"]
            for dname, drafter in drafters.items():
                with KeepTimer() as keep:
                    t = time.perf_counter()
                    r = speculative_generate(target, drafter, p, max_new, sampling, None, torch.Generator().manual_seed(i))
                    s = spec[dname]
                    s["wall"] += time.perf_counter() - t
                s["keep"] += keep.seconds
                s["tokens"] += len(r.tokens)
                s["rounds"] += len(r.emitted_per_round)
                s["emitted"] += sum(r.emitted_per_round)
                for k, v in r.seconds.items():
                    s["parts"][k] = s["parts"].get(k, 0.0) + v
        plain_rate = plain["tokens"] / plain["seconds"]
        for dname, s in spec.items():
            gd = make_session(drafters[dname], 1).block_size
            tau = s["emitted"] / max(s["rounds"], 1)
            speedup = s["tokens"] / s["wall"] / plain_rate
            # the loop's own speedup: both sides without their (identical) prefill, the first token included
            decode_speedup = (s["tokens"] / (s["wall"] - s["parts"]["prefill"])) / (plain["tokens"] / (plain["seconds"] - plain["prefill"]))
            t_step = (plain["seconds"] - plain["prefill"]) / plain["tokens"]  # plain decoding, per token
            t_verify = s["parts"]["verify"] / max(s["rounds"], 1)  # the loop's verify of g+1 tokens, per round
            ideal = tau * t_step / t_verify
            ideal_profiled = tau * cost(1, 1) / cost(1, gd + 1)
            loop = sum(v for k, v in s["parts"].items() if k != "prefill")
            runs.append({"target": name, "drafter": dname, "temperature": T, "tau": tau, "speedup": speedup,
                         "decode_speedup": decode_speedup, "ideal_speedup": ideal, "loop_efficiency": decode_speedup / ideal,
                         "ideal_speedup_profiled": ideal_profiled, "loop_efficiency_profiled": decode_speedup / ideal_profiled,
                         "t_step_ms": 1e3 * t_step, "t_verify_ms": 1e3 * t_verify,
                         "draft_share": s["parts"]["draft"] / loop, "verify_share": s["parts"]["verify"] / loop,
                         "overhead_share": (s["parts"]["schedule"] + s["parts"]["other"]) / loop,
                         "block": gd, "plain_tokens_per_s": plain_rate, "spec_tokens_per_s": s["tokens"] / s["wall"],
                         "trained_drafter": bool(name == "toy" and drafter_paths.get(dname)),
                         "drafter_config": drafters[dname].cfg.to_dict()})
            if hybrid:  # the rollback: the selection (timed in the loop) + the verify's per-position states (profiled)
                at = extra["rollback"][str(gd + 1)]
                extra_forward = (at["verify_ms_with_rollback"] - at["verify_ms_without_rollback"] - at["keep_ms"]) / 1e3
                runs[-1] |= {"rollback_keep_share": s["keep"] / loop,
                             "rollback_share": (s["keep"] + s["rounds"] * max(extra_forward, 0.0)) / loop}
            print(f"{name:11s} {dname:10s} T={T:g}  tau {tau:5.2f}  speedup {speedup:5.2f} (decode {decode_speedup:5.2f})  "
                  f"ideal {ideal:5.2f}  loop_eff {decode_speedup / ideal:5.2f}  draft/verify/overhead {runs[-1]['draft_share']:.2f}/"
                  f"{runs[-1]['verify_share']:.2f}/{runs[-1]['overhead_share']:.2f}", flush=True)
        if T == 0:
            extra["hf"] = hf_baselines(target, tok, ps, max_new, plain_rate)
            print(f"{name:11s} HF generate (T=0, tokens/s vs our plain): " +
                  ", ".join(f"{k} {v['speedup_vs_plain']:.2f}x" for k, v in extra["hf"].items()), flush=True)
    for W, c in extra.get("rollback", {}).items():
        print(f"{name:11s} rollback at W={W}: verify {c['verify_ms_without_rollback']:.2f} -> {c['verify_ms_with_rollback']:.2f} ms "
              f"(selection {c['keep_ms']:.3f} ms): {100 * c['rollback_share_of_verify']:.1f}% of the verify", flush=True)
    for dname, c in extra["draft_cost"].items():
        print(f"{name:11s} {dname:10s} draft cost in target steps at context 100/400/1000: " +
              " / ".join(f"{c[k]['draft_in_target_steps']:.2f}" for k in ("100", "400", "1000")), flush=True)
    return runs, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", nargs="+", default=["toy", "qwen3-30m", "qwen3-100m", "qwen3-400m"])
    ap.add_argument("--drafters", nargs="+", default=["dspark", "dflash", "eagle3"])
    ap.add_argument("--drafter-path", nargs="*", default=[],
                    help="name=export folder for the toy target (dspark=..., or an extra variant such as dspark-r32=...)")
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2, help="random DSpark/DFlash backbone layers")
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--markov-rank", type=int, default=256)
    ap.add_argument("--work-dir", default="runs/bench/targets", help="random targets are saved here once")
    ap.add_argument("--out", default="runs/bench/decoding.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = dict(kv.split("=", 1) for kv in args.drafter_path)
    t0 = time.time()
    runs, targets = [], []
    for name in args.targets:
        r, extra = run_target(name, args, paths)
        runs += r
        targets.append(extra)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "machine": machine(), "seconds": time.time() - t0,
                               "args": vars(args), "runs": runs, "targets": targets}, indent=1))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
