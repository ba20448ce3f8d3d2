"""Which layers a drafter is made of, chosen once from the target's config.

Every target family but Gemma-4 gets Qwen3-shaped layers (the target's head size, KV heads and MLP width,
SwiGLU, bare embedding rows, uncapped logits: what vLLM's Qwen3 drafter classes compute whatever the target); Eagle3's
one layer norms q and k only where the target's attention does (``QK_NORM_MODEL_TYPES``).
Gemma-4 gets its full-attention layers, a sqrt(d) embedding scale and the target's final-logit soft-cap
(``gemma4_layers.py``), exported under the reference's Gemma-4 architectures. The drafters ask this module for
their pieces; none of them checks a model name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from deepspec.drafters import gemma4_layers as g4
from deepspec.drafters.attention import ContextDecoderLayer, RotaryEmbedding


def target_head_dim(tc) -> int:
    """The attention head size Qwen3-shaped draft layers copy from the target; a clear error where the target's
    differs per layer and no draft-layer family for it exists."""
    try:
        return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    except Exception as e:  # noqa: BLE001 -- transformers' per-layer attribute guard
        raise ValueError(f"{tc.model_type}: the target's head_dim differs per layer ({type(e).__name__}); the drafters copy "
                         "one layer shape from the target and do not support this family yet") from None


@dataclass(frozen=True)
class LayerFamily:
    name: str
    context_layer: Callable  # (tc, layer_idx, num_layers) -> a context-injected decoder layer (DSpark, DFlash)
    eagle3_midlayer: Callable  # (tc, intermediate_size, qk_norm) -> Eagle3's one layer
    eagle3_qk_norm: Callable  # (tc, the config's qk_norm or None) -> whether Eagle3's attention norms q and k
    rotary: Callable  # tc -> RotaryEmbedding of the draft layers
    embed_scale: Callable  # tc -> the factor on the embedding rows (None: the bare rows)
    logit_softcap: Callable  # tc -> the cap on draft logits (None: uncapped)
    architectures: dict  # drafter name -> the architecture its export is written as


def _qwen3_context_layer(tc, layer_idx: int, num_layers: int) -> nn.Module:
    return ContextDecoderLayer(tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads,
                               target_head_dim(tc), tc.rms_norm_eps)


def _qwen3_eagle3_midlayer(tc, intermediate: int, qk_norm: bool) -> nn.Module:
    from deepspec.drafters.eagle3 import Eagle3Midlayer

    return Eagle3Midlayer(tc.hidden_size, intermediate, tc.num_attention_heads, tc.num_key_value_heads, target_head_dim(tc),
                          tc.rms_norm_eps, qk_norm)


# Targets whose attention RMS-norms q and k per head (HF q_norm/k_norm): Eagle3 copies it, as DeepSpec's Qwen3Eagle3Model
# does for Qwen3. Llama, Mistral and Gemma-2 have none, and their Eagle3 stays the LlamaForCausalLMEagle3 layer.
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
                       "gemma3", "gemma3_text")


def _qwen3_eagle3_qk_norm(tc, requested: bool | None) -> bool:
    return (getattr(tc, "model_type", None) in QK_NORM_MODEL_TYPES) if requested is None else bool(requested)


def _gemma4_eagle3_qk_norm(tc, requested: bool | None) -> bool:
    if requested is False:
        raise ValueError("drafter.qk_norm=false: the Gemma-4 Eagle3 layer always norms q and k (as the target's and the "
                         "reference's); leave it null")
    return True


QWEN3 = LayerFamily("qwen3", _qwen3_context_layer, _qwen3_eagle3_midlayer, _qwen3_eagle3_qk_norm, RotaryEmbedding, lambda tc: None,
                    lambda tc: None, {"dspark": "Qwen3DSparkModel", "dflash": "DFlashDraftModel", "eagle3": "LlamaForCausalLMEagle3"})
# The reference exports DFlash on Gemma-4 as its DSpark class with markov_rank 0 and no confidence head.
GEMMA4 = LayerFamily("gemma4", g4.Gemma4ContextDecoderLayer, g4.Gemma4Eagle3Midlayer, _gemma4_eagle3_qk_norm, g4.full_attention_rotary,
                     g4.embed_scale, g4.logit_softcap, {"dspark": "Gemma4DSparkModel", "dflash": "Gemma4DSparkModel", "eagle3": "Gemma4Eagle3Model"})


def layer_family(tc) -> LayerFamily:
    """The draft-layer family for the target config ``tc`` (its text config)."""
    if g4.is_gemma4(tc):
        g4.check_gemma4_target(tc)
        return GEMMA4
    return QWEN3


class ScaledEmbedding(nn.Embedding):
    """The target's frozen embedding rows times a family factor (Gemma-4: sqrt(d)), the factor rounded to the
    weight's dtype first as HF's and vLLM's Gemma embeddings round it (62.0 for sqrt(3840) in bf16)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows * torch.tensor(self.scale, dtype=rows.dtype, device=rows.device)


def family_embedding(embed: nn.Embedding, scale: float | None) -> nn.Embedding:
    """``embed`` itself (scale None) or a ScaledEmbedding sharing its weight (the same frozen Parameter)."""
    if scale is None:
        return embed.requires_grad_(False)
    scaled = ScaledEmbedding(*embed.weight.shape, device="meta")
    scaled.weight, scaled.scale = embed.weight, float(scale)
    return scaled.requires_grad_(False)
