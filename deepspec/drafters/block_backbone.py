"""The block-parallel backbone DSpark and DFlash share (one forward pass drafts a whole block).

    H_ctx = hidden_norm(fc(concat of L target layers))              (B, S, d)
    x     = embed([anchor, MASK, ..., MASK]) for every anchor         (B, A*g, d)
    for each layer: x = layer(x, K/V = [proj(H_ctx); proj(x)])      context < anchor, own block
    h     = norm(x)                                                   (B, A, g, d)

``context_kv`` (the per-layer K/V of H_ctx) depends on the context only, so decoding caches it
per token (``deepspec/decoding/sessions``); ``block_hidden`` is the per-round work.

The embedding and LM head are the target's, frozen and shared (never copied); with a reduced draft
vocabulary the LM head is the drafter's own (``draft_vocab.py``). Parameter names match the
reference checkpoint layout (fc, hidden_norm, layers.i.*, norm, lm_head, d2t, t2d).
"""
from __future__ import annotations

import torch
from torch import nn

from deepspec.drafters.attention import ContextDecoderLayer, RMSNorm, RotaryEmbedding, flex_block_mask
from deepspec.drafters.blocks import Blocks, block_attention_mask, flex_mask_mod
from deepspec.drafters.draft_vocab import DraftLMHead, DraftVocab, DraftVocabMixin


def init_trainable(m: nn.Module) -> None:
    """Normal(0, 0.02) for trainable Linear/Embedding weights, zero biases (HF's default init). A reduced-vocabulary
    LM head keeps its start, the target's rows."""
    if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad and not isinstance(m, DraftLMHead):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def target_head_dim(tc) -> int:
    """The attention head size the drafter's layers copy from the target; a clear error where the target's
    differs per layer (Gemma-4's global vs local heads), since the drafter's layers are one shape."""
    try:
        return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    except Exception as e:  # noqa: BLE001 -- transformers' per-layer attribute guard
        raise ValueError(f"{tc.model_type}: the target's head_dim differs per layer ({type(e).__name__}); the drafters copy "
                         "one layer shape from the target and do not support this family yet") from None


class BlockDraftBackbone(DraftVocabMixin, nn.Module):
    """fc + hidden_norm + context-injected layers + norm, over a frozen embedding and the LM head
    (the target's, frozen, or the drafter's own over a reduced vocabulary)."""

    def __init__(self, num_layers: int, target_layer_ids: list[int], attention_backend: str, target_config,
                 embed_tokens: nn.Embedding, lm_head: nn.Linear | None, draft_vocab: DraftVocab | None = None):
        super().__init__()
        tc = target_config
        d, L = tc.hidden_size, len(target_layer_ids)
        head_dim = target_head_dim(tc)
        self.target_config, self.attention_backend = tc, attention_backend
        self.embed_tokens = embed_tokens.requires_grad_(False)
        self.attach_lm_heads(lm_head, draft_vocab, d)
        self.fc = nn.Linear(L * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, tc.rms_norm_eps)
        self.layers = nn.ModuleList(
            ContextDecoderLayer(d, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads, head_dim, tc.rms_norm_eps)
            for _ in range(num_layers))
        self.norm = RMSNorm(d, tc.rms_norm_eps)
        self.rotary = RotaryEmbedding(tc)

    def context_kv(self, hidden: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """hidden (B, C, L*d) target features at ``positions`` (B, C) -> per layer (k, v), each (B, Hkv, C, hd).

        Depends on the context alone: decoding sessions cache it and append only new tokens.
        """
        ctx = self.hidden_norm(self.fc(hidden))  # (B, C, d)
        rope = self.rotary(ctx, positions)
        return [layer.self_attn.context_kv(ctx, rope) for layer in self.layers]

    def block_hidden(self, block_ids: torch.Tensor, block_pos: torch.Tensor, ctx_kv: list, mask,
                     backend: str | None = None, decoding: bool = False) -> torch.Tensor:
        """block_ids, block_pos (B, Q) -> h (B, Q, d): the layers over the block, attending to ``ctx_kv`` and itself.

        ``decoding``: a session's round, whose ``ctx_kv`` have Q free key slots after the context
        (``ContextAttention.forward``)."""
        # The bare target rows, no family scale (not Gemma's sqrt(d) either): what vLLM's DSpark/DFlash loaders feed
        # the drafter (docs/targets.md, "What a drafter sees").
        x = self.embed_tokens(block_ids).to(ctx_kv[0][0].dtype)  # (B, Q, d)
        rope_q = self.rotary(x, block_pos)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, k, v, rope_q, mask, backend or self.attention_backend, decoding)
        return self.norm(x)

    def forward(self, hidden: torch.Tensor, ctx_valid: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        """hidden (B, S, L*d) target features; ctx_valid (B, S) real tokens -> h (B, A, g, d)."""
        B, S, _ = hidden.shape
        A, g = blocks.anchors.shape[1], blocks.block_size
        ctx_kv = self.context_kv(hidden, torch.arange(S, device=hidden.device).expand(B, S))
        if self.attention_backend == "flex":
            mask = flex_block_mask(flex_mask_mod(blocks.anchors, ctx_valid, g), B, A * g, S + A * g, hidden.device)
        else:
            mask = block_attention_mask(blocks.anchors, ctx_valid, g)
        h = self.block_hidden(blocks.input_ids.view(B, A * g), blocks.positions.view(B, A * g), ctx_kv, mask)
        return h.view(B, A, g, -1)

    def prev_tokens(self, block_input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: x_{k-1} = [anchor, label_0, ..., label_{g-2}]. (..., g) -> (..., g)."""
        return torch.cat([block_input_ids[..., :1], labels[..., :-1]], dim=-1)
