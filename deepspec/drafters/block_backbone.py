"""The block-parallel backbone DSpark and DFlash share (one forward pass drafts a whole block).

    H_ctx = hidden_norm(fc(concat of L target layers))              (B, S, d)
    x     = embed([anchor, MASK, ..., MASK]) for every anchor         (B, A*g, d)
    for each layer: x = layer(x, K/V = [proj(H_ctx); proj(x)])      context < anchor, own block
    h     = norm(x)                                                   (B, A, g, d)

``context_kv`` (the per-layer K/V of H_ctx) depends on the context only, so decoding caches it
per token (``deepspec/decoding/sessions``); ``block_hidden`` is the per-round work.

The embedding and LM head are the target's, frozen and shared (never copied); with a reduced draft
vocabulary the LM head is the drafter's own (``draft_vocab.py``). The layers, RoPE, embedding scale and
logit cap come from the target's layer family (``layer_family.py``: Qwen3-shaped, or Gemma-4's).
Parameter names match the reference checkpoint layout (fc, hidden_norm, layers.i.*, norm, lm_head, d2t, t2d).
"""
from __future__ import annotations

import torch
from torch import nn

from deepspec.drafters.attention import RMSNorm, flex_block_mask
from deepspec.drafters.blocks import Blocks, block_attention_mask, flex_mask_mod
from deepspec.drafters.draft_vocab import DraftLMHead, DraftVocab, DraftVocabMixin
from deepspec.drafters.layer_family import family_embedding, layer_family


def init_trainable(m: nn.Module) -> None:
    """Normal(0, 0.02) for trainable Linear/Embedding weights, zero biases (HF's default init). A reduced-vocabulary
    LM head keeps its start, the target's rows."""
    if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad and not isinstance(m, DraftLMHead):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


class BlockDraftBackbone(DraftVocabMixin, nn.Module):
    """fc + hidden_norm + context-injected layers + norm, over a frozen embedding and the LM head
    (the target's, frozen, or the drafter's own over a reduced vocabulary)."""

    def __init__(self, num_layers: int, target_layer_ids: list[int], attention_backend: str, target_config,
                 embed_tokens: nn.Embedding, lm_head: nn.Linear | None, draft_vocab: DraftVocab | None = None):
        super().__init__()
        tc = target_config
        d, L = tc.hidden_size, len(target_layer_ids)
        family = layer_family(tc)
        self.target_config, self.attention_backend, self.family = tc, attention_backend, family.name
        self.embed_tokens = family_embedding(embed_tokens, family.embed_scale(tc))
        self.attach_lm_heads(lm_head, draft_vocab, d, family.logit_softcap(tc))
        self.fc = nn.Linear(L * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, tc.rms_norm_eps)
        self.layers = nn.ModuleList(family.context_layer(tc, i, num_layers) for i in range(num_layers))
        self.norm = RMSNorm(d, tc.rms_norm_eps)
        self.rotary = family.rotary(tc)

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
        # The bare target rows for Qwen3-shaped layers (not Gemma-2/3's sqrt(d) either), scaled rows for Gemma-4:
        # what vLLM's DSpark/DFlash loaders feed each (docs/targets.md, "What a drafter sees").
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
