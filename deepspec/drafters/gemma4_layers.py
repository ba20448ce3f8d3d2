"""Gemma-4 draft layers: what a drafter on a Gemma-4 target is made of (the DeepSpec reference's Gemma-4
DSpark/DFlash/Eagle3 drafters, and vLLM's Gemma-4 DSpark class, build the same).

A Gemma-4 target alternates sliding-window layers (256-wide heads on gemma-4-12B) with full-attention layers
(512-wide heads). Every draft layer is shaped like the target's *full-attention* layer:

    head_dim      = the full-attention head size (``global_head_dim``)
    KV heads      = ``num_global_key_value_heads`` when ``attention_k_eq_v``, else ``num_key_value_heads``
    q             = RoPE(q_norm(q_proj(x)))                      (B, H, T, hd)
    k             = RoPE(k_norm(k_proj(x)))                      (B, Hkv, T, hd)
    v             = v_norm(v_proj(x)), or v_norm(k_proj(x)) under K=V sharing (no v_proj; the raw projection,
                    before k_norm and RoPE); v_norm is an RMSNorm without a scale
    attention     = softmax(q k^T) v   (scale 1: q and k are RMS-normed)
    RoPE          = the target's full-attention parameters ("proportional": only the first
                    partial_rotary_factor * hd / 2 frequency pairs rotate, the rest are identity)
    layer         = (h + post_ff_norm(mlp(pre_ff_norm(h)))) * layer_scalar,
                    h = x + post_attn_norm(attn(input_norm(x)))  (sandwich norms; layer_scalar a (1,) buffer of
                    ones, stored in the checkpoint)
    mlp           = down(act(gate(x)) * up(x)), act = the target's hidden_activation (gelu, tanh approximation)

and the drafter as a whole scales its token embedding by sqrt(d) and soft-caps its logits with the target's
``final_logit_softcapping`` (``embed_scale``, ``logit_softcap``): the reference embeds through
``Gemma4TextScaledWordEmbedding`` and caps in ``compute_logits``, vLLM multiplies by its ``normalizer`` and
builds its logits processor with ``soft_cap``. Names follow the reference checkpoint (``layers.i.self_attn.*``,
``layers.i.{input,post_attention,pre_feedforward,post_feedforward}_layernorm``, ``layers.i.layer_scalar``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepspec.drafters.attention import ContextAttention, RMSNorm, RotaryEmbedding, apply_rope

GEMMA4_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")


def is_gemma4(tc) -> bool:
    return getattr(tc, "model_type", None) in GEMMA4_MODEL_TYPES


def full_attention_shape(tc) -> tuple[int, int]:
    """(KV heads, head dim) of the target's full-attention layers: what every draft layer copies."""
    i = list(tc.layer_types).index("full_attention")
    per_layer = getattr(tc, "per_layer_config", None)  # transformers >= 5.2x: the global sizes live per layer
    if per_layer is not None:
        layer = per_layer[i]
        return int(layer.num_key_value_heads), int(layer.head_dim)
    k_eq_v = bool(getattr(tc, "attention_k_eq_v", False)) and getattr(tc, "num_global_key_value_heads", None)
    return int(tc.num_global_key_value_heads if k_eq_v else tc.num_key_value_heads), int(tc.global_head_dim)


def check_gemma4_target(tc) -> None:
    """Refuse the Gemma-4 variants the draft layers do not build (as the reference refuses them), naming the key."""
    problems = [f"{key}={getattr(tc, key)!r} ({why})" for key, bad, why in (
        ("enable_moe_block", bool(getattr(tc, "enable_moe_block", False)), "MoE draft layers are not built"),
        ("hidden_size_per_layer_input", bool(getattr(tc, "hidden_size_per_layer_input", 0) or 0), "per-layer input gates are not built"))
        if bad]
    if problems:
        raise ValueError(f"{tc.model_type}: the Gemma-4 draft layers do not support " + "; ".join(problems))


def full_attention_rotary(tc) -> RotaryEmbedding:
    """RoPE of the target's full-attention layers over the draft head size. "proportional": inv_freq[i] =
    theta^(-2i/hd) for i < int(p * hd // 2), 0 beyond (those pairs do not rotate), all divided by ``factor``."""
    params = tc.rope_parameters["full_attention"]
    _, hd = full_attention_shape(tc)
    kind, theta = params.get("rope_type", "default"), float(params["rope_theta"])
    if kind not in ("proportional", "default"):
        raise ValueError(f"{tc.model_type}: full-attention rope_type={kind!r} is not built for Gemma-4 drafters")
    pairs = int(float(params.get("partial_rotary_factor", 1.0)) * hd // 2) if kind == "proportional" else hd // 2
    rotated = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.int64).float() / hd)
    inv_freq = torch.cat([rotated, torch.zeros(hd // 2 - pairs)]) / float(params.get("factor", 1.0))
    return RotaryEmbedding(inv_freq=inv_freq)


def embed_scale(tc) -> float:
    return math.sqrt(tc.hidden_size)


def logit_softcap(tc) -> float | None:
    return getattr(tc, "final_logit_softcapping", None) or None


class ScalelessRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) without a learned scale (Gemma-4's v_norm), in fp32."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Gemma4MLP(nn.Module):
    """down(act(gate(x)) * up(x)) with the target's activation; names gate_proj, up_proj, down_proj."""

    def __init__(self, d: int, hidden: int, activation: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def mlp_width(tc, layer_idx: int, num_layers: int) -> int:
    """The reference builds the target's MLP class with the draft layer's index against a config whose layer count
    is the drafter's: double width only where use_double_wide_mlp and the index falls among the last
    num_kv_shared_layers draft layers (never on gemma-4-12B/31B, which share no KV)."""
    first_shared = num_layers - int(getattr(tc, "num_kv_shared_layers", 0) or 0)
    wide = bool(getattr(tc, "use_double_wide_mlp", False)) and layer_idx >= first_shared > 0
    return tc.intermediate_size * (2 if wide else 1)


class Gemma4QKV(nn.Module):
    """The projections and norms of a Gemma-4 full-attention layer over ``d_in``-wide inputs (d: DSpark/DFlash,
    2d: Eagle3). K=V sharing (``k_eq_v``) has no v_proj: V is v_norm of the raw k_proj output."""

    scale = 1.0  # attention scale: q and k are RMS-normed

    def __init__(self, d_in: int, d: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, bias: bool, k_eq_v: bool):
        nn.Module.__init__(self)  # not ContextAttention's constructor: the projections are built here
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(d_in, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_in, num_kv_heads * head_dim, bias=bias)
        self.v_proj = None if k_eq_v else nn.Linear(d_in, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, d, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.v_norm = ScalelessRMSNorm(eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hd)

    def _kv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_in) -> k (RoPE applied), v: (B, Hkv, T, hd)."""
        k_raw = self._heads(self.k_proj(x), self.num_kv_heads)
        v_raw = k_raw if self.v_proj is None else self._heads(self.v_proj(x), self.num_kv_heads)
        return apply_rope(self.k_norm(k_raw), *rope), self.v_norm(v_raw)

    def qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d_in) -> q (B, H, T, hd), k, v (B, Hkv, T, hd); RoPE on q and k."""
        q = apply_rope(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), *rope)
        return (q, *self._kv(x, rope))


class Gemma4ContextAttention(Gemma4QKV, ContextAttention):
    """``ContextAttention`` (context K/V from H_ctx, block K/V from the block, queries from the block) with Gemma-4's
    projections, norms, K=V sharing and attention scale 1."""


def sandwich_norms(module: nn.Module, d: int, eps: float) -> None:
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        setattr(module, name, RMSNorm(d, eps))
    module.register_buffer("layer_scalar", torch.ones(1))  # in the checkpoint (the reference's and vLLM's name)


class Gemma4ContextDecoderLayer(nn.Module):
    """A Gemma-4 full-attention layer with the context injected into its attention (DSpark, DFlash)."""

    def __init__(self, tc, layer_idx: int, num_layers: int):
        super().__init__()
        d, eps = tc.hidden_size, tc.rms_norm_eps
        kv_heads, hd = full_attention_shape(tc)
        sandwich_norms(self, d, eps)
        self.self_attn = Gemma4ContextAttention(d, d, tc.num_attention_heads, kv_heads, hd, eps, bool(tc.attention_bias),
                                                bool(getattr(tc, "attention_k_eq_v", False)))
        self.mlp = Gemma4MLP(d, mlp_width(tc, layer_idx, num_layers), tc.hidden_activation)

    def forward(self, x, ctx_k, ctx_v, rope_q, mask, backend: str, decoding: bool = False) -> torch.Tensor:
        """x (B, Q, d) -> (B, Q, d); the arguments as ``ContextDecoderLayer.forward``."""
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx_k, ctx_v, rope_q, mask, backend, decoding))
        return (h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))) * self.layer_scalar


class Gemma4Eagle3Midlayer(nn.Module):
    """Eagle3's one layer in Gemma-4's shape: attention from the 2d-wide [input_layernorm(embedding);
    hidden_norm(hidden)], sandwich norms, layer_scalar. Exported as the reference's ``layers.0.*``. q and k are always
    RMS-normed (``qk_norm`` is accepted for the family interface and is always true here)."""

    def __init__(self, tc, intermediate: int, qk_norm: bool = True):
        super().__init__()
        d, eps = tc.hidden_size, tc.rms_norm_eps
        kv_heads, hd = full_attention_shape(tc)
        sandwich_norms(self, d, eps)
        self.hidden_norm = RMSNorm(d, eps)
        self.self_attn = Gemma4QKV(2 * d, d, tc.num_attention_heads, kv_heads, hd, eps, bool(tc.attention_bias),
                                   bool(getattr(tc, "attention_k_eq_v", False)))
        self.mlp = Gemma4MLP(d, intermediate, tc.hidden_activation)

    def attention_residual(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, d) residual, attn (B, T, H*hd) attention output -> h (B, T, d)."""
        return hidden + self.post_attention_layernorm(self.self_attn.o_proj(attn))

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        return (h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))) * self.layer_scalar
