"""The hard pieces the drafters share: RMSNorm, RoPE, the Qwen3-shaped MLP, and attention with
an explicit mask on every device (SDPA) or a flex-attention block mask on CUDA.

Masks are boolean with True = may attend, shape (B, 1, Q, K). Every query row must allow at
least one key (the drafters always allow a block to see itself), so SDPA never sees an empty
row (which would give NaN).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "flex")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2) + eps), computed in fp32 (one fused op; the same bits as the 5-op form)."""
        if x.dtype == torch.float32 == self.weight.dtype:  # one op instead of four (the same bits): decoding's hot path
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU MLP with the target's names: gate_proj, up_proj, down_proj."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for any HF config's RoPE (default, llama3, yarn, ... via transformers' init).

    The inverse frequencies stay fp32 whatever the module is cast to (DeepSpeed bf16, ``.to(bf16)``):
    rounded to bf16 they shift cos/sin by up to ~0.75 at position 4000, and serving engines, which
    compute RoPE in fp32, would then disagree with the trained drafter.
    """

    def __init__(self, config=None, inv_freq: torch.Tensor | None = None):
        super().__init__()
        if inv_freq is not None:  # a family that computes its own frequencies (gemma4_layers.py)
            self.inv_freq_fp32, self.attention_scaling = inv_freq.detach().float().clone(), 1.0
            return
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        # Qwen3RotaryEmbedding only reads the generic RoPE fields (rope_parameters, head_dim). Targets whose RoPE
        # differs per layer type (Gemma-3: local vs global base) give the drafter their full-attention RoPE.
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "full_attention" in params:
            config = copy.copy(config)
            config.rope_parameters = params["full_attention"]
        rope = Qwen3RotaryEmbedding(config)
        self.inv_freq_fp32 = rope.inv_freq.detach().float().clone()  # a plain attribute: never cast, never saved
        self.attention_scaling = rope.attention_scaling

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, 1, T, head_dim) in x's dtype (the 1 broadcasts over heads)."""
        if self.inv_freq_fp32.device != x.device:
            self.inv_freq_fp32 = self.inv_freq_fp32.to(x.device)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq_fp32  # (B, 1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        # Skipped where they change nothing (the same bits): a decoding round is bound by op count on small drafters.
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return (cos, sin) if x.dtype == torch.float32 else (cos.to(x.dtype), sin.to(x.dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, 1, T, hd) from ``RotaryEmbedding``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, backend: str = "sdpa", scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention.

    q (B, H, Q, hd); k, v (B, Hkv, K, hd); mask: bool (B, 1, Q, K) for ``sdpa``, a flex
    ``BlockMask`` for ``flex``; ``scale`` None = 1/sqrt(hd) (Gemma-4's layers use 1: q and k are RMS-normed).
    Returns (B, H, Q, hd).
    """
    if backend == "flex":
        return _flex(q.is_cuda)(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


_FLEX = {}


def _flex(compiled: bool):
    """flex_attention, compiled into a fused kernel on CUDA; the eager (unfused) reference elsewhere."""
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[compiled] = torch.compile(flex_attention, dynamic=True) if compiled else flex_attention
    return _FLEX[compiled]


def flex_block_mask(mask_mod: Callable, batch: int, q_len: int, kv_len: int, device) -> object:
    """Build a flex-attention BlockMask from ``mask_mod(b, h, q_idx, kv_idx) -> bool``."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


class ContextAttention(nn.Module):
    """Qwen3 attention whose keys/values are [projection of the context ; projection of the block].

    The same k_proj/v_proj (and k_norm) serve both parts; queries come from the block only.
    Context K/V are computed in every layer from the projected target features (``context_kv``),
    never from the layer's input, so they depend on the context alone: a decoding session computes
    them once per token and caches them, exactly like a target's KV cache.
    """

    scale = None  # attention scale: 1/sqrt(hd)

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(d, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hd)

    def _kv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads))
        return apply_rope(k, *rope), self._heads(self.v_proj(x), self.num_kv_heads)

    def context_kv(self, ctx: torch.Tensor, rope_ctx: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx (B, C, d) projected context features, RoPE at their positions -> k, v (B, Hkv, C, hd)."""
        return self._kv(ctx, rope_ctx)

    def forward(self, x: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, rope_q: tuple, mask, backend: str,
                decoding: bool = False) -> torch.Tensor:
        """x (B, Q, d) block tokens; ctx_k/ctx_v (B, Hkv, C, hd) from ``context_kv``; rope_q at the Q block positions.

        ``decoding`` (a session's round): ctx_k/ctx_v (B, Hkv, C+Q, hd) arrive with Q free slots after the context,
        where the block's own keys are written in place. The cat would copy the cached context per layer per
        round: O(context) memory traffic in a round that is otherwise O(block) apart from attention's reads.
        """
        Q = x.shape[1]
        q = apply_rope(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), *rope_q)
        k, v = self._kv(x, rope_q)
        if decoding:
            ctx_k[:, :, -Q:], ctx_v[:, :, -Q:] = k, v
            k, v = ctx_k, ctx_v
        else:
            k, v = torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2)
        out = attend(q, k, v, mask, backend, self.scale)  # (B, H, Q, hd)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], Q, -1))


class ContextDecoderLayer(nn.Module):
    """A target-shaped decoder layer (Qwen3 names) with the context injected into its attention."""

    def __init__(self, d: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = ContextAttention(d, num_heads, num_kv_heads, head_dim, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(d, intermediate)

    def forward(self, x, ctx_k, ctx_v, rope_q, mask, backend: str, decoding: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx_k, ctx_v, rope_q, mask, backend, decoding)
        return x + self.mlp(self.post_attention_layernorm(x))
