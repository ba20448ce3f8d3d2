"""Eagle3: the autoregressive baseline, one decoder layer over [embedding; target features].

At position t the drafter reads the target's fused features g_t = fc(concat of L layers at t)
and the embedding of token t+1, and predicts token t+2:

    x_t   = [input_layernorm(embed(token_{t+1})) ; hidden_norm(g_t)]        (B, T, 2d)
    h_t   = midlayer(x_t)   (attention from 2d, causal)                      (B, T, d)
            (q/k RMS-normed per head before RoPE where the target's attention is: Qwen3, Qwen3-MoE/-Next/3.5,
             Gemma-3/4 -- as DeepSpec's Qwen3Eagle3Model; not Llama, Mistral, Gemma-2)
    logits = lm_head(norm(h_t))                                              (B, T, N), N = draft vocabulary

Training-time test (TTT) unrolls ``ttt_steps`` steps: step k feeds its own h (instead of g) and
token t+1+k at position t, and predicts token t+2+k. A query at step k sees the step-0 keys at
positions <= t (causal) and, from steps 1..k, only the keys at its own position t: exactly what
the drafter sees at inference when it drafts k tokens past the verified prefix.

Parameter names follow the SpecForge / SGLang / vLLM Eagle3 layout (midlayer.*, fc, norm, lm_head). Without
QK-norm the export is ``LlamaForCausalLMEagle3`` (vLLM, SGLang, TensorRT-LLM; 3 target layers); with it,
vLLM's ``Eagle3Qwen3ForCausalLM`` (the one engine class read that has q_norm/k_norm), or DeepSpec's own
``Qwen3Eagle3Model`` (``export_drafter(layout="reference")``, the layer under ``layers.0.*``). On a Gemma-4 target the midlayer is
Gemma-4's full-attention layer (``gemma4_layers.Gemma4Eagle3Midlayer``: sandwich norms, K=V sharing,
layer_scalar), the embedding is scaled by sqrt(d), the logits are soft-capped, and the export is the
reference's ``Gemma4Eagle3Model`` (the layer under ``layers.0.*``). The embedding and LM head are
the target's, frozen and shared; with a reduced draft vocabulary (``draft_vocab.py``) the LM head
is the drafter's own (N, d) and the chain feeds back target ids.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepspec.drafters.attention import MLP, RMSNorm, apply_rope, attend, flex_block_mask
from deepspec.drafters.block_backbone import init_trainable
from deepspec.drafters.draft_vocab import DraftVocab, DraftVocabMixin
from deepspec.drafters.layer_family import family_embedding, layer_family

EAGLE3_LOSS_NORMALIZATIONS = ("local_mean", "valid_token_mean")


@dataclass
class Eagle3Config:
    """Drafter hyper-parameters (the target's shape comes from its HF config)."""

    ttt_steps: int = 7
    """Training-time-test unrolling depth (= draft chain length it is trained for)."""
    step_loss_decay: float = 0.8
    """Step k's loss is weighted decay**k."""
    target_layer_ids: list[int] = field(default_factory=lambda: [1, 17, 33])
    """Target layers fused by fc (3 keeps the export loadable by SGLang/vLLM)."""
    intermediate_size: int = 0
    """MLP width of the midlayer; 0 = the target's. Widening it matches another drafter's parameter count
    (equal-budget comparisons); the export's config.json carries it, as Eagle3 loaders read it."""
    attention_backend: str = "sdpa"
    """sdpa (explicit mask, any device) | flex (flex attention, CUDA)."""
    draft_vocab_size: Optional[int] = None
    """Tokens the drafter predicts (None = the target's whole vocabulary, its frozen LM head); N < V trains an
    own LM head over the N most frequent supervised tokens of the cache (deepspec/drafters/draft_vocab.py)."""
    draft_vocab_file: Optional[str] = None
    """A draft vocabulary map (.safetensors with d2t) to use instead of counting the cache; its size must be
    draft_vocab_size."""
    qk_norm: Optional[bool] = None
    """Per-head RMSNorm of q and k (q_norm/k_norm) in the midlayer; None = as the target's attention (``layer_family``:
    Qwen3-like and Gemma-3/4 targets yes, Llama/Mistral/Gemma-2 no). DeepSpec's Qwen3 Eagle3 has it."""
    loss_normalization: str = "local_mean"
    """How each TTT step's summed soft CE is divided: ``local_mean`` = by batch x padded sequence length, DeepSpec's
    (its note: the token mean lets long sequences dominate and lowers acceptance); ``valid_token_mean`` = by the
    number of supervised positions of that step (deepspec's earlier rule)."""

    def __post_init__(self):
        if self.loss_normalization not in EAGLE3_LOSS_NORMALIZATIONS:
            raise ValueError(f"drafter.loss_normalization={self.loss_normalization!r} is not one of {list(EAGLE3_LOSS_NORMALIZATIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class Eagle3Attention(nn.Module):
    """Llama-style attention whose q/k/v read the 2d-wide [embedding; hidden] input."""

    scale = None  # attention scale: 1/sqrt(hd)

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(2 * d, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * d, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * d, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d, bias=False)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, 2d) -> q (B, H, T, hd), k, v (B, Hkv, T, hd) before RoPE."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, 2d) -> q (B, H, T, hd), k, v (B, Hkv, T, hd) with RoPE applied."""
        q, k, v = self.heads(x)
        return apply_rope(q, *rope), apply_rope(k, *rope), v


class Eagle3QKNormAttention(Eagle3Attention):
    """``Eagle3Attention`` with the Qwen3 layer's per-head RMSNorm on q and k before RoPE (q_norm, k_norm [hd]),
    as DeepSpec's ``Qwen3Eagle3Attention`` and vLLM's ``Eagle3Qwen3ForCausalLM`` compute it."""

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__(d, num_heads, num_kv_heads, head_dim)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().heads(x)
        return self.q_norm(q), self.k_norm(k), v


class Eagle3Midlayer(nn.Module):
    def __init__(self, d: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 qk_norm: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(d, eps)
        self.hidden_norm = RMSNorm(d, eps)
        self.self_attn = (Eagle3QKNormAttention(d, num_heads, num_kv_heads, head_dim, eps) if qk_norm
                          else Eagle3Attention(d, num_heads, num_kv_heads, head_dim))
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(d, intermediate)

    def attention_residual(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, d) residual, attn (B, T, H*hd) attention output -> h (B, T, d)."""
        return hidden + self.self_attn.o_proj(attn)

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))


def ttt_mask(T: int, step: int, valid: torch.Tensor) -> torch.Tensor:
    """Bool mask (B, 1, T, (step+1)*T): causal over step-0 keys (real tokens only), diagonal over steps 1..step."""
    idx = torch.arange(T, device=valid.device)
    causal = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :].bool()  # (B, T, T)
    causal = causal | torch.eye(T, dtype=torch.bool, device=valid.device)[None]  # a padded row still sees itself
    diag = torch.eye(T, dtype=torch.bool, device=valid.device)[None].expand(valid.shape[0], -1, -1)
    return torch.cat([causal] + [diag] * step, dim=-1)[:, None]


def ttt_attend(q: torch.Tensor, past_kv: list, causal: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of TTT step k = len(past_kv) - 1 without materialising its (T, (k+1)T) score matrix.

    Query t sees the step-0 keys allowed by ``causal`` (B, 1, T, T) and, from each later step j, only
    its own position's key: scores [q K_0^T | q.k_j(t) for j = 1..k] share one softmax. The same result as
    SDPA over the concatenated keys with ``ttt_mask(T, k, valid)`` (tested), in O(T^2 + kT) instead of
    O(kT^2): at 7 steps most of an Eagle3 training step was attention over masked-out keys.
    q (B, H, T, hd); past_kv[j] = (k_j, v_j), each (B, Hkv, T, hd); scale None = 1/sqrt(hd). Returns (B, H, T, hd).
    """
    B, H, T, hd = q.shape
    Hkv = past_kv[0][0].shape[1]
    qg = q.view(B, Hkv, H // Hkv, T, hd)  # grouped-query heads share their K/V head
    (k0, v0), later = past_kv[0], past_kv[1:]
    scores = [torch.matmul(qg, k0[:, :, None].transpose(-1, -2)).masked_fill(~causal[:, :, None], float("-inf"))]  # (B, Hkv, G, T, T)
    scores += [(qg * kj[:, :, None]).sum(-1, keepdim=True) for kj, _ in later]  # (B, Hkv, G, T, 1) each
    w = torch.softmax(torch.cat(scores, -1).float() * (hd**-0.5 if scale is None else scale), dim=-1).to(q.dtype)
    out = torch.matmul(w[..., :T], v0[:, :, None])
    for j, (_, vj) in enumerate(later):
        out = out + w[..., T + j : T + j + 1] * vj[:, :, None]
    return out.reshape(B, H, T, hd)


class Eagle3Drafter(DraftVocabMixin, nn.Module):
    def __init__(self, cfg: Eagle3Config, target_config, embed_tokens: nn.Embedding, lm_head: nn.Linear | None,
                 draft_vocab: DraftVocab | None = None):
        super().__init__()
        tc = target_config
        d, L = tc.hidden_size, len(cfg.target_layer_ids)
        family = layer_family(tc)  # Qwen3-shaped, or Gemma-4's layer (layer_family.py)
        cfg = replace(cfg, qk_norm=family.eagle3_qk_norm(tc, cfg.qk_norm))  # resolved: the export records it
        self.cfg, self.target_config, self.family = cfg, tc, family.name
        self.embed_tokens = family_embedding(embed_tokens, family.embed_scale(tc))
        self.attach_lm_heads(lm_head, draft_vocab, d, family.logit_softcap(tc))
        self.fc = nn.Linear(L * d, d, bias=False)
        self.midlayer = family.eagle3_midlayer(tc, cfg.intermediate_size or tc.intermediate_size, cfg.qk_norm)
        self.norm = RMSNorm(d, tc.rms_norm_eps)
        self.rotary = family.rotary(tc)
        self.apply(init_trainable)

    def _layer(self, tokens_emb, hidden, rope, past_kv: list, mask) -> torch.Tensor:
        """One midlayer pass at one TTT step; appends this step's K/V to past_kv. Returns pre-norm h (B, T, d)."""
        m = self.midlayer
        x = torch.cat([m.input_layernorm(tokens_emb), m.hidden_norm(hidden)], dim=-1)  # (B, T, 2d)
        q, k, v = m.self_attn.qkv(x, rope)
        past_kv.append((k, v))
        if self.cfg.attention_backend == "flex":
            K = torch.cat([kv[0] for kv in past_kv], dim=2)  # (B, Hkv, (step+1)*T, hd)
            V = torch.cat([kv[1] for kv in past_kv], dim=2)
            out = attend(q, K, V, mask, "flex", m.self_attn.scale)
        else:
            out = ttt_attend(q, past_kv, mask, m.self_attn.scale)
        h = m.attention_residual(hidden, out.transpose(1, 2).reshape(*hidden.shape[:-1], -1))  # (B, T, d)
        return m.mlp_residual(h)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """TTT unroll. hidden (B, S, L*d); input_ids, valid (B, S) -> post-norm h (B, K, S, d) for steps 0..K-1.

        Step k at position t consumed token t+1+k (zero past the end) and predicts token t+2+k.
        """
        B, S = input_ids.shape
        g = self.fc(hidden)  # (B, S, d)
        pos = torch.arange(S, device=hidden.device).expand(B, S)
        past_kv: list = []
        outs, h = [], g
        for k in range(self.cfg.ttt_steps):
            shifted = F.pad(input_ids[:, 1 + k :], (0, 1 + k))  # token t+1+k, 0 past the end
            emb = self.embed_tokens(shifted).to(g.dtype)  # bare rows (Qwen3-shaped) or sqrt(d)-scaled (Gemma-4), as in vLLM
            rope = self.rotary(emb, pos + k)
            mask = self._mask(S, k, valid, hidden.device)
            h = self._layer(emb, h, rope, past_kv, mask)
            outs.append(self.norm(h))
        return torch.stack(outs, dim=1)

    def _mask(self, T: int, step: int, valid: torch.Tensor, device):
        if self.cfg.attention_backend != "flex":
            return ttt_mask(T, 0, valid)  # step-0 keys only: ttt_attend adds the diagonal of steps 1..step
        v = valid.bool()

        def mask_mod(b, h, q_idx, kv_idx):
            same_step0 = (kv_idx < T) & (((kv_idx <= q_idx) & v[b, kv_idx.clamp(max=T - 1)]) | (kv_idx == q_idx))
            return same_step0 | ((kv_idx >= T) & (kv_idx % T == q_idx))

        return flex_block_mask(mask_mod, valid.shape[0], T, (step + 1) * T, device)
