#!/usr/bin/env python
"""llama.cpp (CPU, tag b11434) serving one of our drafter exports beside this project's engine, greedy, same prompts.

    scripts/setup_llamacpp.sh      # once: builds llama.cpp into ~/.cache/deepspec/llama.cpp-b11434
    python scripts/bench_llamacpp.py --drafter-path runs/x/export [--prompts 8] [--new-tokens 64] [--threads 2]

The toy target and the drafter are converted to F32 GGUF with llama.cpp's converter (deepspec/llamacpp.py). Both
engines get the same token ids: llama.cpp's tokenization of the held-out chat prompts (the toy tokenizer splits
newlines apart, llama.cpp's gpt2 pre-tokenizer does not, so ids are shared, not strings). Per prompt, interleaved:

* llama.cpp plain greedy (llama-completion) and speculative greedy (llama-speculative-simple, draft-dspark, up to
  block_size drafts a round): the texts must be equal (lossless); tokens/s, drafted, accepted, rounds, draft time.
* ours at F32: plain greedy (its text against llama.cpp's, with the first differing token) and speculative greedy
  (acceptance length = tokens per target pass, the bonus token included, as llama.cpp counts it).

Implied costs, from llama.cpp's own timers: a plain step t1 = plain seconds / tokens; a round = speculative seconds /
rounds, of which the drafter's share is llama.cpp's draft timer (dur(b,g,a)); the verify pass is the rest. Writes
eval/results/benchmarks/llamacpp_<kind>_toy_cpu_<threads>threads.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from bench_setup import REPO, TOY_DIR, machine, target_config
from deepspec import llamacpp
from deepspec.decoding.speculative import autoregressive_generate, speculative_generate
from deepspec.decoding.verify import SamplingConfig
from deepspec.export import load_drafter
from deepspec.target import TargetModel, load_tokenizer

EOG = (0, 2)  # <|endoftext|>, <|im_end|>: llama.cpp stops at either (end-of-generation tokens)


def chat_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "deepspec/assets/toy_prompts/heldout.jsonl").read_text().splitlines()[:n]]
    return [f"<|im_start|>user\n{r['turns'][0]}<|im_end|>\n<|im_start|>assistant\n" for r in rows]


def until_eog(tokens: list[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in EOG), tokens)


def first_difference(tok, ours: list[int], text: str) -> int | None:
    """Index of our first token whose text leaves llama.cpp's text (None: ours is all of it, token for token)."""
    for i in range(1, len(ours) + 1):
        if not text.startswith(tok.decode(ours[:i])):
            return i - 1
    return None if tok.decode(ours) == text else len(ours)


def prompt_row(args, tok, target, drafter, gguf: dict, prompt: str) -> dict:
    ids = torch.tensor(llamacpp.tokenize(gguf["target"], prompt))
    greedy = SamplingConfig(temperature=0)
    spec = llamacpp.decode_speculative(gguf["target"], gguf["draft"], prompt, args.new_tokens, args.block_size,
                                       threads=args.threads)
    plain = llamacpp.decode_plain(gguf["target"], prompt, spec.tokens, args.threads)  # as many tokens as the speculative run
    ours_plain = until_eog(autoregressive_generate(target, ids, spec.tokens, greedy, eos_token_id=2).tokens)
    ours_spec = speculative_generate(target, drafter, ids, args.new_tokens, greedy, eos_token_id=2)
    return {"prompt_tokens": len(ids), "speculative_text_equals_plain": spec.text == plain.text,
            "ours_first_difference_from_llamacpp_plain": first_difference(tok, ours_plain, plain.text),
            "ours_tokens_compared": len(ours_plain),
            "llamacpp_plain": {"tokens": plain.tokens, "timed_tokens": plain.timed_tokens, "seconds": plain.seconds},
            "llamacpp_speculative": {"tokens": spec.tokens, "seconds": spec.seconds, "rounds": spec.rounds,
                                     "drafted": spec.drafted, "accepted": spec.accepted, "draft_seconds": spec.draft_seconds},
            "ours_speculative": {"tokens": len(ours_spec.tokens), "rounds": len(ours_spec.emitted_per_round),
                                 "accepted": sum(ours_spec.accepted_per_round)}}


def summary(rows: list[dict]) -> dict:
    def total(side: str, key: str) -> float:
        return sum(r[side][key] for r in rows)

    t1 = total("llamacpp_plain", "seconds") / total("llamacpp_plain", "timed_tokens")  # one plain step
    rounds, spec_s, draft_s = (total("llamacpp_speculative", k) for k in ("rounds", "seconds", "draft_seconds"))
    tau_llamacpp = total("llamacpp_speculative", "tokens") / rounds
    tau_ours = total("ours_speculative", "tokens") / total("ours_speculative", "rounds")
    plain_tps, spec_tps = 1 / t1, total("llamacpp_speculative", "tokens") / spec_s
    return {"acceptance_length": {"llamacpp": tau_llamacpp, "ours": tau_ours, "relative_difference": tau_llamacpp / tau_ours - 1},
            "acceptance_rate": {"llamacpp": total("llamacpp_speculative", "accepted") / total("llamacpp_speculative", "drafted"),
                                "ours_accepted_per_round": total("ours_speculative", "accepted") / total("ours_speculative", "rounds"),
                                "llamacpp_accepted_per_round": total("llamacpp_speculative", "accepted") / rounds},
            "llamacpp_tokens_per_second": {"plain": plain_tps, "speculative": spec_tps, "speedup": spec_tps / plain_tps},
            "implied_costs": {"plain_step_ms": 1e3 * t1, "round_ms": 1e3 * spec_s / rounds,
                              "draft_ms_per_round": 1e3 * draft_s / rounds, "verify_ms_per_round": 1e3 * (spec_s - draft_s) / rounds,
                              "draft_in_plain_steps": draft_s / rounds / t1,
                              "verify_in_plain_steps": (spec_s - draft_s) / rounds / t1},
            "all_speculative_texts_equal_plain": all(r["speculative_text_equals_plain"] for r in rows),
            "prompts_where_ours_equals_llamacpp_plain": sum(r["ours_first_difference_from_llamacpp_plain"] is None for r in rows),
            "prompts": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafter-path", required=True, help="a DSpark or DFlash export of a drafter for the toy target")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if reason := llamacpp.unavailable_reason():
        raise SystemExit(reason)
    torch.set_num_threads(args.threads)
    tcfg = target_config("toy", REPO / "runs" / "bench" / "targets")
    target, tok = TargetModel.from_config(tcfg), load_tokenizer(tcfg)
    drafter = load_drafter(args.drafter_path, target=tcfg).eval()
    export = json.loads((Path(args.drafter_path) / "config.json").read_text())
    kind, args.block_size = export["deepspec"]["drafter"], export["block_size"]
    load_before = os.getloadavg()  # a busy machine slows llama.cpp's threads far more than PyTorch's (spin barriers)
    with tempfile.TemporaryDirectory() as work:
        gguf = {"target": llamacpp.convert(TOY_DIR, Path(work) / "toy_target_f32.gguf"),
                "draft": llamacpp.convert(args.drafter_path, Path(work) / "draft_f32.gguf", target_dir=TOY_DIR)}
        rows = [prompt_row(args, tok, target, drafter, gguf, p) for p in chat_prompts(args.prompts)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    result = {"llamacpp": llamacpp.LLAMACPP_TAG, "commit": commit, "machine": machine(),
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}, "drafter_path": args.drafter_path,
              "drafter": {k: export.get(k) for k in ("architectures", "block_size", "num_hidden_layers", "markov_rank",
                                                     "draft_vocab_size", "target_layer_ids")},
              "spec_type": llamacpp.SPEC_TYPE, "precision": "f32 (GGUF F32; ours fp32)",
              "new_tokens": args.new_tokens, "summary": summary(rows), "prompts": rows}
    out = Path(args.out or REPO / "eval/results/benchmarks" / f"llamacpp_{kind}_toy_cpu_{args.threads}threads.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
