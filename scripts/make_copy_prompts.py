#!/usr/bin/env python
"""Build the copy-heavy prompt set ``deepspec/assets/eval_prompts/copy_edit.jsonl``: "edit this function" prompts
whose answers repeat most of the prompt.

    python scripts/make_copy_prompts.py [--rows 24]

Per held-out toy prompt (``deepspec/assets/toy_prompts/heldout.jsonl``: "Complete the body of this Python function"
with a standard-library signature and docstring): the function is shown first, whole, then the prompt asks for its
body again, as the toy target was trained to answer. The body shown is the toy target's own greedy answer to the
original prompt, not the standard library's: a 5.8M-parameter toy does not copy a body it was shown (measured: its
answers to prompts showing the library's body repeat ~10% of it), so the set would not be copy-heavy for it. With its
own answer shown, the answer repeats most of the prompt at T = 0 (and much of it at T = 1): the set measures
proposers where the answer is in the prompt, as in code edits, not the target's skill at copying.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "deepspec" / "assets" / "toy_prompts" / "heldout.jsonl"
OUT = REPO / "deepspec" / "assets" / "eval_prompts" / "copy_edit.jsonl"


def edit_prompt(turn: str, body: str) -> str:
    """A "complete this function" prompt with the function shown whole first (its signature and docstring from
    ``turn``, then ``body``), asked for again."""
    head = turn.split("```python\n", 1)[1].rsplit("```", 1)[0]  # the signature and docstring
    return f"Here is a Python function:\n```python\n{head}{body}\n```\nEdit it: keep its behaviour and write the body again.\n" + turn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=160, help="longest body shown (the toy's own answer)")
    args = ap.parse_args()
    from deepspec.config.data import TargetConfig
    from deepspec.decoding.speculative import autoregressive_generate
    from deepspec.decoding.verify import SamplingConfig
    from deepspec.target import TargetModel, load_tokenizer

    tcfg = TargetConfig(name_or_path="toy", dtype="float32", device="cpu")
    target, tok = TargetModel.from_config(tcfg), load_tokenizer(tcfg)
    rows = []
    for raw in HELDOUT.read_text().splitlines()[: args.rows]:
        row = json.loads(raw)
        turn = row["turns"][0]
        ids = tok(tok.apply_chat_template([{"role": "user", "content": turn}], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt").input_ids[0]
        with torch.inference_mode():
            answer = autoregressive_generate(target, ids, args.max_new_tokens, SamplingConfig(0), tok.eos_token_id).tokens
        body = tok.decode(answer, skip_special_tokens=True).split("```")[0].rstrip()
        rows.append({"source": row["source"], "turns": [edit_prompt(turn, body)]})
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
