"""The block-parallel backbone DSpark and DFlash share (one forward pass drafts a whole block).

    H_ctx = hidden_norm(fc(concat of L target layers))              (B, S, d)
    x     = embed([anchor, MASK, ..., MASK]) for every anchor         (B, A*g, d)
    for each layer: x = layer(x, K/V = [proj(H_ctx); proj(x)])      context < anchor, own block
    h     = norm(x)                                                   (B, A, g, d)

The embedding and LM head are the target's, frozen and shared (never copied). Parameter names
match the reference checkpoint layout (fc, hidden_norm, layers.i.*, norm).
"""
from __future__ import annotations

import torch
from torch import nn

from deepspec.drafters.attention import ContextDecoderLayer, RMSNorm, RotaryEmbedding, flex_block_mask
from deepspec.drafters.blocks import Blocks, block_attention_mask, flex_mask_mod


def init_trainable(m: nn.Module) -> None:
    """Normal(0, 0.02) for trainable Linear/Embedding weights, zero biases (HF's default init)."""
    if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad:
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


class BlockDraftBackbone(nn.Module):
    """fc + hidden_norm + context-injected layers + norm, over a frozen embedding and LM head."""

    def __init__(self, num_layers: int, target_layer_ids: list[int], attention_backend: str, target_config,
                 embed_tokens: nn.Embedding, lm_head: nn.Linear):
        super().__init__()
        tc = target_config
        d, L = tc.hidden_size, len(target_layer_ids)
        head_dim = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
        self.target_config, self.attention_backend = tc, attention_backend
        self.embed_tokens, self.lm_head = embed_tokens.requires_grad_(False), lm_head.requires_grad_(False)
        self.fc = nn.Linear(L * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, tc.rms_norm_eps)
        self.layers = nn.ModuleList(
            ContextDecoderLayer(d, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads, head_dim, tc.rms_norm_eps)
            for _ in range(num_layers))
        self.norm = RMSNorm(d, tc.rms_norm_eps)
        self.rotary = RotaryEmbedding(tc)

    def forward(self, hidden: torch.Tensor, ctx_valid: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        """hidden (B, S, L*d) target features; ctx_valid (B, S) real tokens -> h (B, A, g, d)."""
        B, S, _ = hidden.shape
        A, g = blocks.anchors.shape[1], blocks.block_size
        ctx = self.hidden_norm(self.fc(hidden))  # (B, S, d)
        x = self.embed_tokens(blocks.input_ids.view(B, A * g)).to(ctx.dtype)  # (B, Q, d), Q = A*g
        block_pos = blocks.positions.view(B, A * g)
        ctx_pos = torch.arange(S, device=hidden.device).expand(B, S)
        rope_q = self.rotary(x, block_pos)
        rope_kv = self.rotary(x, torch.cat([ctx_pos, block_pos], dim=1))
        if self.attention_backend == "flex":
            mask = flex_block_mask(flex_mask_mod(blocks.anchors, ctx_valid, g), B, A * g, S + A * g, hidden.device)
        else:
            mask = block_attention_mask(blocks.anchors, ctx_valid, g)
        for layer in self.layers:
            x = layer(x, ctx, rope_q, rope_kv, mask, self.attention_backend)
        return self.norm(x).view(B, A, g, -1)

    def prev_tokens(self, block_input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: x_{k-1} = [anchor, label_0, ..., label_{g-2}]. (..., g) -> (..., g)."""
        return torch.cat([block_input_ids[..., :1], labels[..., :-1]], dim=-1)
