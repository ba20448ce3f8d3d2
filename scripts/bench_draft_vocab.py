#!/usr/bin/env python
"""Reduced draft vocabulary, measured: full vocabulary vs ``drafter.draft_vocab_size``, side by side.

    python scripts/bench_draft_vocab.py [--threads 2] [--parts size toy] [--out eval/results/benchmarks/draft_vocab_cpu_2threads.json]

Part ``size`` (V = 151,936, N = 32,768, a random Qwen3-shaped target: hidden 256, 8 heads of 32 / 2 KV
heads, MLP 768, untied embedding and LM head, built in memory, nothing downloaded): per drafter
(DSpark 2 layers + rank-256 Markov head, DFlash 2 layers, Eagle3), full and reduced,

* parameters: trainable, frozen (the target's embedding and LM head the drafter holds), and exported
  (what ``export_drafter(include_frozen=False)`` writes);
* one training step (the train stage's ``DrafterWithLoss`` forward, loss, backward, AdamW step; no
  DeepSpeed) on a synthetic 1 x 1,024-token sample with 64 anchors (block drafters): median wall and CPU
  (all threads) seconds over ``--steps`` after one warm-up, the fastest of ``--repeats`` interleaved runs;
* memory: peak resident set size (``ru_maxrss``) of a fresh subprocess per setting, and its growth over
  the RSS measured after building the drafter and optimizer (torch on the CPU has no allocator
  statistics; the growth is the step's activations, gradients and optimizer state).

Part ``toy`` (the embedded toy target, V = 4,096, N = 1,024): DSpark (2 layers, rank 96) trained with the
train entry point on one cache, full vs reduced, the same steps / batch / lr / seed; reported: the
validation expected tau (analytic acceptance), the fraction of training labels the draft vocabulary
covers, wall seconds, and the real speculative-decoding tau (T = 0 and T = 1) on held-out prompts.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

V_BIG, N_BIG = 151_936, 32_768
V_TOY, N_TOY = 4_096, 1_024
DRAFTERS = {"dspark": {"block_size": 7, "num_hidden_layers": 2, "markov_rank": 256, "num_anchors": 64},
            "dflash": {"block_size": 7, "num_hidden_layers": 2, "num_anchors": 64},
            "eagle3": {"ttt_steps": 7}}


def qwen3_shape():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=V_BIG, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=False)


def size_child(name: str, reduced: bool, steps: int, threads: int, seq: int) -> dict:
    """One setting, in its own process (so that ru_maxrss is this setting's)."""
    import torch

    from deepspec.config.train import LossConfig
    from deepspec.drafters import DRAFTERS as SPECS
    from deepspec.drafters.draft_vocab import DraftVocab
    from deepspec.export import TRAINING_ONLY
    from deepspec.training.step import DrafterWithLoss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tc = qwen3_shape()
    d, layers = tc.hidden_size, [0, 1, 3]
    embed, head = torch.nn.Embedding(V_BIG, d), torch.nn.Linear(d, V_BIG, bias=False)
    g = torch.Generator().manual_seed(0)
    vocab = DraftVocab(torch.sort(torch.randperm(V_BIG, generator=g)[:N_BIG]).values, V_BIG) if reduced else None
    spec = SPECS[name]
    fields = {**DRAFTERS[name], "target_layer_ids": layers, "draft_vocab_size": N_BIG if reduced else None}
    if name != "eagle3":
        fields["mask_token_id"] = 3
    drafter = spec.model_class(spec.config_class(**fields), tc, embed, head, vocab)
    params = {id(p): p for p in drafter.parameters()}.values()  # tied/shared once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    # what export_drafter(include_frozen=False) writes: no embedding; the LM head where the file carries it (a reduced
    # vocabulary's own head, and Eagle3's always: SGLang expects it)
    head_in_file = reduced or name == "eagle3"
    exported = sum(v.numel() for k, v in drafter.state_dict().items()
                   if not k.startswith(TRAINING_ONLY) and k != "embed_tokens.weight" and (head_in_file or k != "lm_head.weight"))
    model = DrafterWithLoss(drafter, spec.kind, LossConfig())
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(5, V_BIG, (1, seq), generator=g)
    loss_mask = torch.ones(1, seq, dtype=torch.uint8)
    loss_mask[:, : seq // 8] = 0
    batch = {"input_ids": ids, "loss_mask": loss_mask, "valid": torch.ones(1, seq, dtype=torch.bool),
             "hidden": torch.randn(1, seq, len(layers) * d, generator=g), "final_hidden": torch.randn(1, seq, d, generator=g),
             "sample_seed": torch.tensor([1])}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for step in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        out = model(batch, step)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # CPU seconds of all threads: less sensitive than wall time to a busy machine
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = sorted(times[1:]), sorted(cpu[1:])
    return {"drafter": name, "vocab": N_BIG if reduced else V_BIG, "trainable_parameters": trainable, "frozen_parameters": frozen,
            "exported_elements": exported, "step_seconds_median": times[len(times) // 2], "step_seconds_min": times[0],
            "step_cpu_seconds_median": cpu[len(cpu) // 2],
            "peak_rss_mib": peak / 1024, "rss_after_setup_mib": rss_before / 1024, "step_rss_growth_mib": (peak - rss_before) / 1024}


def part_size(args) -> dict:
    rows = []
    for rep in range(args.repeats):
        for name in args.drafters:
            for reduced in (False, True):  # interleaved: full then reduced, per drafter, per repeat
                cmd = [sys.executable, __file__, "--child", name, str(int(reduced)), "--steps", str(args.steps),
                       "--threads", str(args.threads), "--seq", str(args.seq)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-3000:])
                rows.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "repeat": rep})
                print(json.dumps(rows[-1]), flush=True)
    best = {}
    for r in rows:  # per (drafter, vocab): the fastest repeat's time, the largest memory
        key = f"{r['drafter']}/{'reduced' if r['vocab'] == N_BIG else 'full'}"
        b = best.setdefault(key, dict(r))
        b["step_seconds_median"] = min(b["step_seconds_median"], r["step_seconds_median"])
        b["step_cpu_seconds_median"] = min(b["step_cpu_seconds_median"], r["step_cpu_seconds_median"])
        b["peak_rss_mib"] = max(b["peak_rss_mib"], r["peak_rss_mib"])
        b["step_rss_growth_mib"] = max(b["step_rss_growth_mib"], r["step_rss_growth_mib"])
    ratios = {n: {"trainable": best[f"{n}/reduced"]["trainable_parameters"] / best[f"{n}/full"]["trainable_parameters"],
                  "step_time": best[f"{n}/reduced"]["step_seconds_median"] / best[f"{n}/full"]["step_seconds_median"],
                  "step_cpu_time": best[f"{n}/reduced"]["step_cpu_seconds_median"] / best[f"{n}/full"]["step_cpu_seconds_median"],
                  "step_rss_growth": best[f"{n}/reduced"]["step_rss_growth_mib"] / best[f"{n}/full"]["step_rss_growth_mib"]}
              for n in args.drafters}
    return {"vocab_size": V_BIG, "draft_vocab_size": N_BIG, "target_shape": {k: getattr(qwen3_shape(), k) for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")},
            "sequence_tokens": args.seq, "steps_timed": args.steps, "repeats": args.repeats, "settings": best,
            "reduced_over_full": ratios, "all": rows}


def real_tau(export: Path, prompts: int, max_new: int) -> dict:
    """Speculative decoding with the exported drafter on held-out toy prompts: tau (bonus included) at T=0 and T=1."""
    import torch

    from deepspec.config.data import TargetConfig
    from deepspec.decoding.speculative import speculative_generate
    from deepspec.decoding.verify import SamplingConfig
    from deepspec.export import load_drafter
    from deepspec.target import TargetModel, load_tokenizer

    tcfg = TargetConfig(name_or_path="toy", layer_ids=[0, 2, 4], mask_token_id=3)
    target, tok, drafter = TargetModel.from_config(tcfg), load_tokenizer(tcfg), load_drafter(export, target=tcfg)
    rows = [json.loads(line) for line in (REPO / "deepspec/assets/toy_prompts/heldout.jsonl").read_text().splitlines()[:prompts]]
    out = {}
    for temperature in (0.0, 1.0):
        emitted = []
        for i, r in enumerate(rows):
            text = tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            res = speculative_generate(target, drafter, ids, max_new, SamplingConfig(temperature), tok.eos_token_id,
                                       torch.Generator().manual_seed(i))
            emitted += [m + 1 for m, L in zip(res.accepted_per_round, res.verified_per_round) if L > 0]
        out[f"T{temperature:g}"] = {"tau": sum(emitted) / max(len(emitted), 1), "rounds": len(emitted)}
    return out


def part_toy(args) -> dict:
    import torch

    from deepspec.data.cache.token_counts import supervised_token_counts
    from deepspec.drafters.draft_vocab import DraftVocab

    work = Path(args.work_dir)
    from bench_train import small_cache  # the same toy cache builder as the other training benches

    cache = small_cache(work / "cache", args.toy_rows)
    counts = supervised_token_counts(cache, V_TOY, args.val_fraction)
    covered = float(counts[DraftVocab.from_counts(counts, N_TOY).draft_ids].sum() / counts.sum())
    runs = {}
    for label, extra in (("full", []), ("reduced", [f"drafter.draft_vocab_size={N_TOY}"])):
        run_dir = work / f"dspark-{label}"
        cmd = [sys.executable, str(REPO / "train" / "train.py"), "target=toy", "drafter=dspark", f"cache_dir={cache}", f"run_dir={run_dir}",
               "drafter.num_hidden_layers=2", "drafter.markov_rank=96", "drafter.num_anchors=32", f"max_steps={args.toy_steps}",
               "global_batch_size=8", "micro_batch_size=8", "optim.lr=1e-3", "deepspeed.precision=fp32", "deepspeed.zero_stage=0",
               f"eval.val_fraction={args.val_fraction}", f"eval.every_steps={args.toy_steps // 4}", "eval.max_samples=48",
               "checkpoint.every_steps=1000000", "checkpoint.resume=never", "logging.progress=false", "logging.every_steps=25", *extra]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
        result = json.loads((run_dir / "result.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [{"step": e["step"], "expected_tau": e["val/expected_tau"]} for e in rows if "val/expected_tau" in e]
        runs[label] = {"val_expected_tau_best": result["best_val_expected_tau"],
                       "val_expected_tau_last": result["last_eval"].get("expected_tau"), "wall_seconds": seconds,
                       "real_tau": real_tau(run_dir / "export", args.tau_prompts, args.tau_max_new), "evals": evals,
                       "last_eval": result["last_eval"]}
        print(label, json.dumps({k: v for k, v in runs[label].items() if k not in ("evals", "last_eval")}), flush=True)
    return {"vocab_size": V_TOY, "draft_vocab_size": N_TOY, "label_coverage_of_draft_vocab": covered, "steps": args.toy_steps,
            "cache_rows": args.toy_rows, "global_batch_size": 8, "lr": 1e-3, "drafter": "dspark, 2 layers, Markov rank 96, 32 anchors",
            "runs": runs, "tau_prompts": args.tau_prompts, "tau_max_new_tokens": args.tau_max_new,
            "val_expected_tau_change": runs["reduced"]["val_expected_tau_last"] - runs["full"]["val_expected_tau_last"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("DRAFTER", "REDUCED"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", default=["size", "toy"])
    ap.add_argument("--drafters", nargs="+", default=list(DRAFTERS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--toy-rows", type=int, default=600)
    ap.add_argument("--toy-steps", type=int, default=200)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--tau-prompts", type=int, default=6)
    ap.add_argument("--tau-max-new", type=int, default=64)
    ap.add_argument("--work-dir", default="runs/bench/draft_vocab")
    ap.add_argument("--out", default="eval/results/benchmarks/draft_vocab_cpu_2threads.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(size_child(args.child[0], bool(int(args.child[1])), args.steps, args.threads, args.seq)))
        return
    import platform

    import torch

    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d")}, "command": " ".join(sys.argv)}
    out_path = Path(args.out)
    if out_path.exists():  # parts measured in an earlier run are kept
        out = {**json.loads(out_path.read_text()), **out}
    if "size" in args.parts:
        out["size"] = {**part_size(args), "command": out["command"]}
    if "toy" in args.parts:
        out["toy"] = {**part_toy(args), "command": out["command"]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k in ("machine",)}, indent=1))


if __name__ == "__main__":
    main()
