"""A tiny, randomly initialised Qwen3 target with the embedded toy tokenizer: an HF folder for tests and
campaigns that need a real model but no trained weights (seconds to build, milliseconds per forward)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOY_TARGET_DIR = Path(__file__).resolve().parent / "assets" / "toy_target"
TOY_PROMPTS_DIR = Path(__file__).resolve().parent / "assets" / "toy_prompts"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_target(path: Path, hidden_size: int = 64, layers: int = 4, seed: int = 0) -> Path:
    """Save a randomly initialised Qwen3 with the toy tokenizer to ``path`` (an HF folder)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(TOY_TARGET_DIR / f, path / f)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=4096, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2,
                         pad_token_id=0, initializer_range=0.1)  # peaked distributions, like a trained LM
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def write_toy_prompts(path: Path, rows: int) -> Path:
    """The first ``rows`` conversations of the toy training prompt set, as a JSONL file at ``path``."""
    with open(TOY_PROMPTS_DIR / "train.jsonl") as src, open(path, "w") as dst:
        for _, line in zip(range(rows), src):
            dst.write(line)
    return path
