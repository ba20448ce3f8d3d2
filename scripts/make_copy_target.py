#!/usr/bin/env python
"""A toy target that copies: the embedded toy, fine-tuned to write again a function body it was shown.

    python scripts/make_copy_target.py [--steps 300] [--out runs/bench/targets/toy_copy]

The embedded toy (5.8M parameters) does not copy text from its prompt: asked to write a body it was just shown, its
answers repeat ~10% of it (``scripts/make_copy_prompts.py``), and ``copy_edit`` is copy-heavy for it at T = 0 only
because the body shown there is its own greedy answer. At T > 0 its samples leave that answer within a few tokens, so
no proposer that reads the prompt can pay there. Code edits on a real model are not like that: the answer repeats the
prompt at any temperature, because the model copies. This script makes a toy that does: it fine-tunes the toy on
training-split functions (``deepspec/assets/toy_prompts/train.jsonl``; the held-out packages behind ``copy_edit`` are
never seen) laid out as ``copy_edit`` lays out its prompts (the function shown whole, then asked for its body), half
of the batches copy samples, half the toy's ordinary chat samples (it still answers the original prompts). The loss
is on the assistant's tokens only. Used by the lookup benchmarks (``--target toy_copy``) to measure the lookup at
T = 1 where the target copies; the drafters trained on the toy are not trained on it (the gates keep them off).

Writes an HF folder (config, weights, the toy's tokenizer and chat template) and ``copy_train_log.json`` with the
held-out copy rate: the share of copy_edit's shown bodies that sampled answers (T = 1) repeat token for token.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRAIN = REPO / "deepspec" / "assets" / "toy_prompts" / "train.jsonl"
TOY = REPO / "deepspec" / "assets" / "toy_target"


def copy_sample(conv: list[dict]) -> list[dict] | None:
    """A training conversation as copy_edit lays out its prompts: the function shown whole, then asked for again."""
    from make_copy_prompts import edit_prompt

    turn, body = conv[0]["content"], conv[1]["content"]
    if "```python\n" not in turn:
        return None
    return [{"role": "user", "content": edit_prompt(turn, body.rstrip())}, {"role": "assistant", "content": body}]


def encode(tok, conv: list[dict], max_len: int) -> tuple[list[int], list[int]] | None:
    """-> token ids and a 0/1 mask over the next-token targets of the assistant's turn (its end marker included)."""
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(conv, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    ids = tok(full, add_special_tokens=False).input_ids[:max_len]
    if len(ids) <= len(p_ids) + 1:
        return None
    return ids, [0] * (len(p_ids) - 1) + [1] * (len(ids) - len(p_ids))


def batches(samples: list[tuple[list[int], list[int]]], batch: int, pad: int, rng: random.Random):
    """Endless padded batches (B, S+1) ids and (B, S) masks, shuffled each pass."""
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            rows = [samples[j] for j in order[i : i + batch]]
            S = max(len(ids) for ids, _ in rows)
            x = torch.tensor([ids + [pad] * (S - len(ids)) for ids, _ in rows])
            m = torch.tensor([mask + [0] * (S - 1 - len(mask)) for _, mask in rows], dtype=torch.float32)
            yield x, m


@torch.inference_mode()
def copy_rate(model, tok, prompts: int = 8, max_new: int = 64, seed: int = 0) -> float:
    """Share of sampled (T = 1) answer tokens that continue the body copy_edit's prompt shows, token for token."""
    from deepspec.decoding.sessions.lookup import NgramIndex

    rows = [json.loads(r) for r in (REPO / "deepspec/assets/eval_prompts/copy_edit.jsonl").read_text().splitlines()[:prompts]]
    hits = total = 0
    gen = torch.Generator().manual_seed(seed)
    for row in rows:
        text = tok.apply_chat_template([{"role": "user", "content": row["turns"][0]}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        index = NgramIndex(3, 3)
        index.append(ids[0].tolist())
        out = ids
        for _ in range(max_new):  # plain sampling; each token checked against what a 3-gram lookup would propose
            nxt = torch.multinomial(torch.softmax(model(out).logits[0, -1].float(), -1), 1, generator=gen)
            cont, n = index.match(out[0, -3:].tolist(), 1, own=False)
            hits += bool(n) and cont[0] == int(nxt)
            total += 1
            index.append(out[0, -1:].tolist())
            out = torch.cat([out, nxt[None]], 1)
            if int(nxt) == tok.eos_token_id:
                break
    return hits / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-len", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "targets" / "toy_copy"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from deepspec.config.data import TargetConfig
    from deepspec.target import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = load_tokenizer(TargetConfig(name_or_path="toy"))
    model = AutoModelForCausalLM.from_pretrained(TOY, dtype=torch.float32)
    convs = [json.loads(r)["conversations"] for r in TRAIN.read_text().splitlines()]
    copies = [s for s in (encode(tok, c, args.max_len) for c in map(copy_sample, convs) if c) if s]
    plain = [s for s in (encode(tok, c, args.max_len) for c in convs) if s]
    before = copy_rate(model.eval(), tok)
    print(f"{len(copies)} copy samples, {len(plain)} chat samples; copy rate before {before:.3f}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = 20
    lr_at = lambda s: args.lr * min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))  # noqa: E731
    sources = [batches(copies, args.batch, tok.pad_token_id, rng), batches(plain, args.batch, tok.pad_token_id, rng)]
    model.train()
    t0, log = time.time(), []
    for step in range(args.steps):
        x, m = next(sources[step % 2])  # alternate: a copy batch, then an ordinary one
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(x[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"step": step, "kind": ("copy", "chat")[step % 2], "loss": loss.item()})
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} {log[-1]['kind']} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    after = copy_rate(model.eval(), tok)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOY / f, out / f)
    summary = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "minutes": (time.time() - t0) / 60,
               "copy_rate_T1_before": before, "copy_rate_T1_after": after, "log": log}
    (out / "copy_train_log.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}: copy rate at T = 1 {before:.3f} -> {after:.3f} in {summary['minutes']:.1f} min")


if __name__ == "__main__":
    main()
