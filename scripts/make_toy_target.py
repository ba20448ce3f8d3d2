#!/usr/bin/env python
"""Build the embedded toy target: a byte-level BPE tokenizer and a small Qwen3 trained on the CPU.

The corpus is the Python standard library of the interpreter running this script (found through
`sysconfig`), so the model is real code-completion LM trained on code nobody here wrote. Two kinds
of sample feed the LM:

* raw module text, and
* chat samples built with `ast`: the user turn is a function's signature and docstring, the
  assistant turn is its body (the shape of HumanEval prompts), rendered with a ChatML template.

A fixed list of stdlib packages (HELDOUT_PACKAGES) never reaches the tokenizer or the model; their
chat samples become the held-out prompt set and their text the held-out loss.

Outputs (defaults):
  deepspec/assets/toy_target/        HF folder: config.json, model.safetensors, tokenizer files,
                                     chat template, README.md (the model card), train_log.json
  deepspec/assets/toy_prompts/       train.jsonl (conversations) and heldout.jsonl (turns layout)

Usage:  python scripts/make_toy_target.py [--steps 1800] [--threads 2]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

REPO = Path(__file__).resolve().parents[1]
# Never seen in training: these packages are the held-out evaluation set.
HELDOUT_PACKAGES = ("email", "http", "json", "urllib", "wsgiref", "xmlrpc", "statistics", "difflib")
# Data tables and generated files, not code a user would write.
SKIPPED_PACKAGES = ("encodings", "pydoc_data", "test", "site-packages", "idlelib", "lib2to3", "turtledemo")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
USER_PREFIX = "Complete the body of this Python function:\n"


# ----------------------------------------------------------------------------- corpus
def stdlib_modules() -> dict[str, list[tuple[str, str]]]:
    """Return {"train"|"heldout": [(relative path, source text), ...]} for the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    split: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/")[0].removesuffix(".py")
        if top in SKIPPED_PACKAGES or "/test" in rel or "/tests/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split["heldout" if top in HELDOUT_PACKAGES else "train"].append((rel, text))
    return split


def chat_samples(rel: str, source: str, max_body_lines: int = 40) -> list[dict]:
    """Functions with a docstring -> {"id", "conversations"}: user = signature + docstring, assistant = body."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc_node, body = node.body[0], node.body[1:]
        if not body:
            continue
        head = lines[node.lineno - 1 : doc_node.end_lineno]  # decorators left out
        body_lines = lines[body[0].lineno - 1 : node.end_lineno]
        if not 2 <= len(body_lines) <= max_body_lines:
            continue
        indent = min(len(l) - len(l.lstrip()) for l in head if l.strip())
        head_text = "\n".join(l[indent:] for l in head)
        body_text = "\n".join(l[indent:] if len(l) >= indent else l.lstrip() for l in body_lines)
        sample_id = hashlib.sha1(f"{rel}:{node.lineno}:{node.name}".encode()).hexdigest()[:16]
        out.append({
            "id": sample_id,
            "source": f"{rel}:{node.lineno}",
            "conversations": [
                {"role": "user", "content": USER_PREFIX + "```python\n" + head_text + "\n```"},
                {"role": "assistant", "content": body_text},
            ],
        })
    return out


def render_chat(conversations: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversations)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Newlines are tokens of their own: otherwise "\n" merges with the next line's indentation, and a
    # prompt ending in "<|im_start|>assistant\n" stops at a token boundary never seen in training.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|mask|>"],
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.model_max_length = 2048
    return hf


# ----------------------------------------------------------------------------- model
def build_model(vocab_size: int, tok: PreTrainedTokenizerFast, args) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden_size // 64, num_key_value_heads=2,
        head_dim=64, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, dtype="float32",
    )
    return Qwen3ForCausalLM(config)


def pack(docs: list[list[int]], seq_len: int, eot: int) -> torch.Tensor:
    """Concatenate token lists separated by end-of-text and cut into (N, seq_len + 1) rows."""
    flat: list[int] = []
    for d in docs:
        flat.extend(d)
        flat.append(eot)
    n = (len(flat) - 1) // seq_len
    t = torch.tensor(flat[: n * seq_len + 1], dtype=torch.long)
    return torch.stack([t[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch: int, mask: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy (nats) over rows (N, S+1); mask (N, S) selects scored targets."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        m = torch.ones_like(nll) if mask is None else mask[i : i + batch].float()
        total += (nll * m).sum().item()
        count += m.sum().item()
    model.train()
    return total / max(count, 1)


def chat_rows_with_mask(tok, samples: list[dict], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chat sample on its own row (padded); mask marks assistant-body targets only."""
    rows, masks = [], []
    for s in samples:
        prompt = tok(render_chat(s["conversations"][:1]) + "<|im_start|>assistant\n")["input_ids"]
        full = tok(render_chat(s["conversations"]))["input_ids"][: seq_len + 1]
        if len(full) <= len(prompt) + 1:
            continue
        m = [0] * (len(prompt) - 1) + [1] * (len(full) - len(prompt))
        pad = seq_len + 1 - len(full)
        rows.append(full + [tok.pad_token_id] * pad)
        masks.append(m + [0] * pad)
    return torch.tensor(rows), torch.tensor(masks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "deepspec/assets/toy_target")
    ap.add_argument("--prompts-out", type=Path, default=REPO / "deepspec/assets/toy_prompts")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--chat-repeats", type=int, default=3, help="chat samples are seen this many times per raw-text pass")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=450)
    ap.add_argument("--bench", action="store_true", help="time 10 steps and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()

    # 1. Corpus and prompt sets.
    modules = stdlib_modules()
    chats = {k: [c for rel, src in v for c in chat_samples(rel, src)] for k, v in modules.items()}
    args.prompts_out.mkdir(parents=True, exist_ok=True)
    with open(args.prompts_out / "train.jsonl", "w") as f:
        for s in chats["train"]:
            f.write(json.dumps(s) + "\n")
    with open(args.prompts_out / "heldout.jsonl", "w") as f:
        for s in chats["heldout"]:
            f.write(json.dumps({"id": s["id"], "source": s["source"], "turns": [s["conversations"][0]["content"]],
                                "reference": s["conversations"][1]["content"]}) + "\n")
    print(f"corpus: {len(modules['train'])} train modules, {len(modules['heldout'])} held-out modules; "
          f"chat samples {len(chats['train'])} train / {len(chats['heldout'])} held-out", flush=True)

    # 2. Tokenizer (train split only).
    tok = train_tokenizer([src for _, src in modules["train"]] + [render_chat(c["conversations"]) for c in chats["train"]],
                          args.vocab_size)
    eot = tok.pad_token_id
    enc = lambda texts: tok(texts)["input_ids"]
    raw_train = enc([src for _, src in modules["train"]])
    chat_train = enc([render_chat(c["conversations"]) for c in chats["train"]])
    raw_held = pack(enc([src for _, src in modules["heldout"]]), args.seq_len, eot)
    chat_held, chat_held_mask = chat_rows_with_mask(tok, chats["heldout"], args.seq_len)
    n_raw, n_chat = sum(map(len, raw_train)), sum(map(len, chat_train))
    print(f"tokens: raw {n_raw:,}  chat {n_chat:,}  held-out raw {raw_held.numel():,}  "
          f"({time.time() - t0:.0f}s)", flush=True)

    # 3. Model and schedule.
    model = build_model(len(tok), tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    lr_at = lambda s: args.lr * min(1.0, (s + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))

    def epoch_rows() -> torch.Tensor:
        docs = raw_train + chat_train * args.chat_repeats
        rng.shuffle(docs)
        rows = pack(docs, args.seq_len, eot)
        return rows[torch.randperm(len(rows))]

    rows, cursor, log = epoch_rows(), 0, []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        if cursor + args.batch > len(rows):
            rows, cursor = epoch_rows(), 0
        x = rows[cursor : cursor + args.batch]
        cursor += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.bench and step == 9:
            dt = time.time() - t_train
            print(f"bench: {10 * args.batch * args.seq_len / dt:.0f} tokens/s", flush=True)
            return
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step}/{args.steps} loss {loss.item():.3f} lr {lr_at(step):.2e} "
                  f"{(step + 1) * args.batch * args.seq_len / el:.0f} tok/s elapsed {el / 60:.1f}m", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            ev = {"step": step + 1, "train_loss": loss.item(),
                  "heldout_raw_nats": mean_loss(model, raw_held[:64], args.batch),
                  "heldout_chat_body_nats": mean_loss(model, chat_held[:256], args.batch, chat_held_mask[:256])}
            log.append(ev)
            print("eval", json.dumps(ev), flush=True)

    # 4. Final evaluation on the full held-out split, then save.
    final = {"heldout_raw_nats": mean_loss(model, raw_held, args.batch),
             "heldout_chat_body_nats": mean_loss(model, chat_held, args.batch, chat_held_mask)}
    print("final", json.dumps(final), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "bfloat16"
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    model.generation_config.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    summary = {
        "python": sys.version.split()[0], "heldout_packages": HELDOUT_PACKAGES, "parameters": n_params,
        "tokens_trained": args.steps * args.batch * args.seq_len, "corpus_tokens": {"raw": n_raw, "chat": n_chat},
        "train_minutes": (time.time() - t_train) / 60, "args": {k: str(v) for k, v in vars(args).items()},
        "evals": log, "final": final,
    }
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=1))
    (args.out / "README.md").write_text(model_card(summary, args, len(tok), len(chats["train"]), len(chats["heldout"])))
    print(f"saved to {args.out} ({time.time() - t0:.0f}s total)")


def model_card(s: dict, args, vocab: int, n_train_chat: int, n_held_chat: int) -> str:
    f = s["final"]
    return f"""---
license: psf-2.0
library_name: transformers
tags: [deepspec, toy, speculative-decoding]
---
# deepspec toy target (Qwen3 architecture, {s['parameters'] / 1e6:.1f}M parameters)

The small, real language model that deepspec ships so that its whole pipeline (target cache,
drafter training, speculative decoding eval) runs on any CPU without a model hub.

- **Architecture**: `Qwen3ForCausalLM`, {args.layers} layers, hidden {args.hidden_size}, 
  {args.hidden_size // 64} query heads / 2 KV heads of dim 64, MLP {args.hidden_size * 3}, tied embeddings,
  stored in bf16.
- **Tokenizer**: byte-level BPE, {vocab} tokens, trained on the training corpus. Special tokens
  `<|endoftext|>` (pad / document separator), `<|im_start|>`, `<|im_end|>` (end of turn, EOS) and
  `<|mask|>` (never seen in training: reserved as the drafter's mask token). ChatML chat template.
- **Corpus**: the Python {s['python']} standard library (`sysconfig` stdlib path, test suites and
  data tables skipped): raw module text ({s['corpus_tokens']['raw']:,} tokens) plus {n_train_chat:,}
  chat samples built with `ast` (user = signature + docstring, assistant = body;
  {s['corpus_tokens']['chat']:,} tokens, repeated {args.chat_repeats}x per pass).
- **Held out entirely**: packages {', '.join(s['heldout_packages'])} ({n_held_chat:,} chat prompts in
  `deepspec/assets/toy_prompts/heldout.jsonl`).
- **Budget**: {s['tokens_trained']:,} training tokens ({args.steps} steps x {args.batch} x {args.seq_len}),
  AdamW lr {args.lr} warmup {args.warmup} + cosine, bf16 autocast on the CPU, {s['train_minutes']:.0f} minutes
  on {args.threads} CPU threads.
- **Held-out loss**: {f['heldout_raw_nats']:.3f} nats/token on held-out module text;
  {f['heldout_chat_body_nats']:.3f} nats/token on held-out assistant bodies given their prompt.

Remake it with `python scripts/make_toy_target.py` (same arguments as recorded in
`train_log.json`). A different Python version gives a different corpus; the prompt sets committed
beside the model keep the demo reproducible.
"""


if __name__ == "__main__":
    main()
