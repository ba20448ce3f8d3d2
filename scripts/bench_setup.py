"""What the decoding benchmarks share: targets (the toy one and random Qwen3s of a given size),
drafters (trained exports or random), prompts, and a side-by-side timer. A random Qwen3.5 is a hybrid target: its
gated delta-net layers keep recurrent states that the engine rolls back per row (deepspec/decoding/target_cache.py).

Random targets use the toy tokenizer (vocabulary 4,096) and HF's own initialisation; they test
speed at a model shape, not acceptance (their drafters are random too, unless one is given).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOY_DIR = REPO / "deepspec" / "assets" / "toy_target"
PROMPTS = REPO / "deepspec" / "assets" / "toy_prompts" / "heldout.jsonl"

# name -> (hidden, layers, intermediate, heads, kv heads): Qwen3-shaped, ~parameters in the name (vocab 4,096)
RANDOM_QWEN3 = {
    "qwen3-30m": (512, 8, 1536, 8, 4),
    "qwen3-100m": (768, 14, 2304, 12, 4),
    "qwen3-400m": (1280, 20, 3840, 16, 8),
}

# name -> the same shape fields: Qwen3.5-shaped hybrids, 3 gated delta-net layers to 1 attention layer, the linear
# layers' key/value heads in Qwen3.5-4B's proportions (key width 0.8 d, twice as many value heads as key heads)
RANDOM_QWEN3_5 = {
    "qwen3_5-30m": (512, 8, 1536, 8, 4),
}


def target_dir(name: str, root: Path) -> Path:
    """The toy target's folder, or a random Qwen3 / Qwen3.5 (hybrid) saved once under ``root``."""
    if name == "toy":
        return TOY_DIR
    if name == "toy_copy":  # the toy fine-tuned to copy (scripts/make_copy_target.py): minutes to build, so built on request
        if not (root / name / "model.safetensors").exists():
            raise SystemExit(f"{root / name} is missing: python scripts/make_copy_target.py --out {root / name}")
        return root / name
    import transformers as T

    path = root / name
    if not (path / "model.safetensors").exists():
        hybrid = name in RANDOM_QWEN3_5
        d, L, inter, heads, kv = (RANDOM_QWEN3_5 if hybrid else RANDOM_QWEN3)[name]
        path.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(TOY_DIR / f, path / f)
        torch.manual_seed(0)
        shape = dict(vocab_size=4096, hidden_size=d, intermediate_size=inter, num_hidden_layers=L, num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=d // heads, max_position_embeddings=4096, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=2, pad_token_id=0)
        if hybrid:
            key_heads = d // 160  # 2560 / 16 heads of 128 in Qwen3.5-4B: a key width of 0.8 d
            model = T.Qwen3_5ForCausalLM(T.Qwen3_5TextConfig(**shape, linear_num_key_heads=key_heads, linear_key_head_dim=128,
                                                              linear_num_value_heads=2 * key_heads, linear_value_head_dim=128))
        else:
            model = T.Qwen3ForCausalLM(T.Qwen3Config(**shape))
        model.save_pretrained(path)
    return path


def target_config(name: str, root: Path):
    """A TargetConfig with three context layers spread over the depth (the toy's preset for the toy)."""
    from transformers import AutoConfig

    from deepspec.config.data import TargetConfig

    path = target_dir(name, root)
    L = AutoConfig.from_pretrained(path).num_hidden_layers
    layers = [0, 2, 4] if name in ("toy", "toy_copy") else [1, L // 2, L - 2]
    return TargetConfig(name_or_path="toy" if name == "toy" else str(path), layer_ids=layers, mask_token_id=3, dtype="float32",
                        device="cpu")


def build_drafter(name: str, tcfg, path: str | None = None, layers: int = 2, block: int = 7, rank: int = 256):
    """A trained export (``path``) or a random drafter of the given shape, in eval mode."""
    from deepspec.config.train import TrainStageConfig
    from deepspec.export import load_drafter
    from deepspec.training.trainer import build_drafter as build

    if path:
        return load_drafter(path, target=tcfg).eval()
    spec = {"dspark": {"name": "dspark", "block_size": block, "num_hidden_layers": layers, "markov_rank": rank},
            "dflash": {"name": "dflash", "block_size": block, "num_hidden_layers": layers},
            "eagle3": {"name": "eagle3", "ttt_steps": block}}[name]
    drafter, _ = build(TrainStageConfig(target=tcfg, drafter=spec, cache_dir="unused"), torch.device("cpu"))
    return drafter.eval()


def prompts(tokenizer, n: int, offset: int = 0) -> list[torch.Tensor]:
    """The first ``n`` held-out toy prompts (never trained on), chat-templated -> token ids."""
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[offset : offset + n]]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": r["turns"][0]}], tokenize=False,
                                                    add_generation_prompt=True),
                      add_special_tokens=False, return_tensors="pt").input_ids[0] for r in rows]


def machine() -> dict:
    return {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "device": "cpu"}
