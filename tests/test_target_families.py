"""The target returns what HF's own model returns, per family: Gemma-2's final-logit soft-capping
is applied wherever the engine, the cache or the losses compute the target's logits."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_FILES, TOY_DIR
from deepspec.config.data import TargetConfig
from deepspec.decoding.speculative import autoregressive_generate, speculative_generate
from deepspec.decoding.verify import SamplingConfig
from deepspec.target import TargetModel, final_logit_softcap


def save_tiny(path: Path, family: str) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, final_logit_softcapping=2.0, attn_logit_softcapping=50.0,
                                               sliding_window=8, query_pre_attn_scalar=32))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=True))
    path.mkdir(parents=True)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(TOY_DIR / f, path / f)
    return path


@pytest.mark.parametrize("family,cap", [("gemma2", 2.0), ("qwen3", None)])
def test_target_logits_equal_hf_logits(tmp_path, family, cap):
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / family, family)
    attn = "eager" if family == "gemma2" else "sdpa"  # HF: Gemma-2's attention soft-capping has no sdpa path
    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=[0, 2], dtype="float32", device="cpu",
                                                  attn_implementation=attn))
    assert final_logit_softcap(target.model.config) == cap
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    ids = torch.randint(4, 4096, (2, 12))
    mask = torch.ones_like(ids)
    from transformers import DynamicCache

    _, final = target.decoder_with_positions(ids, mask, torch.arange(12).expand(2, 12), DynamicCache())
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(target.logits(final), expected, rtol=1e-5, atol=1e-5)
    if cap:
        assert (target.lm_head(final) - expected).abs().max() > 1e-2  # the raw head differs: the cap matters here


def test_gemma2_speculative_greedy_equals_plain_greedy(tmp_path):
    from deepspec.drafters import DSparkConfig, DSparkDrafter
    from deepspec.target import load_frozen_embeddings

    path = save_tiny(tmp_path / "gemma2", "gemma2")
    tcfg = TargetConfig(name_or_path=str(path), layer_ids=[0, 2], dtype="float32", device="cpu", mask_token_id=3,
                        attn_implementation="eager")
    target = TargetModel.from_config(tcfg)
    embed, head = load_frozen_embeddings(tcfg)
    torch.manual_seed(1)
    drafter = DSparkDrafter(DSparkConfig(block_size=3, num_hidden_layers=1, markov_rank=8, target_layer_ids=[0, 2], mask_token_id=3),
                            target.model.config, embed, head).eval()
    from transformers import DynamicCache

    from deepspec.losses import target_logits

    ids = torch.randint(4, 4096, (1, 6))
    _, final = target.decoder_with_positions(ids, torch.ones_like(ids), torch.arange(6)[None], DynamicCache())
    torch.testing.assert_close(target_logits(drafter, final), target.logits(final))  # the losses' soft labels, capped too
    greedy = SamplingConfig(temperature=0)
    for n in (5, 9):
        prompt = torch.randint(4, 4096, (n,))
        assert speculative_generate(target, drafter, prompt, 20, greedy).tokens == autoregressive_generate(target, prompt, 20, greedy).tokens
