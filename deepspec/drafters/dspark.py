"""DSpark: a block-parallel drafter with a sequential (Markov) head and a confidence head.

Read top to bottom (the backbone is block_backbone.py, shared with DFlash):

    h        = backbone(target features, [anchor, MASK, ...])         (B, A, g, d)
    logits_k = lm_head(h_k) + W2 z_k,   z_k from W1[x_{k-1}]          (Markov head, heads.py)
    conf_k   = sigmoid(proj([h_k; W1[x_{k-1}]]))                      (confidence head)

The embedding and LM head are the target's, frozen; only fc, hidden_norm, the layers, norm and
the two heads train. With a reduced draft vocabulary of N tokens (``draft_vocab.py``) the drafter's
own LM head (N, d) trains too, W2 maps r -> N, and W1 stays (V, r): x_{k-1} is a target id. ``logits`` and ``confidence_logits`` work on any subset of blocks, so the
loss can walk the vocabulary-sized part in chunks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from deepspec.drafters.block_backbone import BlockDraftBackbone, init_trainable
from deepspec.drafters.draft_vocab import DraftVocab
from deepspec.drafters.heads import ConfidenceHead, MarkovHead


@dataclass
class DSparkConfig:
    """Drafter hyper-parameters (the target's shape comes from its HF config)."""

    block_size: int = 7
    """Draft tokens per block (gamma); the anchor slot predicts too."""
    num_hidden_layers: int = 2
    """Backbone decoder layers."""
    markov_rank: int = 256
    """Rank r of the sequential head (0 = no sequential head)."""
    markov_head_type: str = "vanilla"
    """vanilla | gated | rnn."""
    enable_confidence_head: bool = True
    """Train the confidence head (predicts P(token k survives | tokens < k accepted))."""
    confidence_head_with_markov: bool = True
    """Feed W1[x_{k-1}] to the confidence head besides h_k."""
    num_anchors: int = 512
    """Blocks sampled per training sample."""
    mask_token_id: int = 0
    """Unused vocabulary id filling the non-anchor slots."""
    target_layer_ids: list[int] = field(default_factory=lambda: [1, 9, 17, 25, 33])
    """Target layers whose hidden states form the context."""
    attention_backend: str = "sdpa"
    """sdpa (explicit mask, any device) | flex (flex attention, CUDA)."""
    draft_vocab_size: Optional[int] = None
    """Tokens the drafter predicts (None = the target's whole vocabulary, its frozen LM head); N < V trains an
    own LM head over the N most frequent supervised tokens of the cache (deepspec/drafters/draft_vocab.py)."""
    draft_vocab_file: Optional[str] = None
    """A draft vocabulary map (.safetensors with d2t) to use instead of counting the cache; its size must be
    draft_vocab_size."""

    def to_dict(self) -> dict:
        return asdict(self)


class DSparkDrafter(BlockDraftBackbone):
    """DSpark drafter: the shared block backbone plus the Markov and confidence heads."""

    def __init__(self, cfg: DSparkConfig, target_config, embed_tokens: nn.Embedding, lm_head: nn.Linear | None,
                 draft_vocab: DraftVocab | None = None):
        super().__init__(cfg.num_hidden_layers, cfg.target_layer_ids, cfg.attention_backend, target_config, embed_tokens, lm_head,
                         draft_vocab)
        self.cfg = cfg
        d, V, r = target_config.hidden_size, target_config.vocab_size, cfg.markov_rank
        self.markov_head = MarkovHead(V, d, r, cfg.markov_head_type, self.draft_vocab_size) if r > 0 else None
        with_markov = cfg.confidence_head_with_markov and r > 0
        self.confidence_head = ConfidenceHead(d, r if with_markov else 0) if cfg.enable_confidence_head else None
        self.apply(init_trainable)

    # ------------------------------------------------------------------ heads (any subset of blocks)
    def logits(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """h (n, g, d), prev (n, g) target ids -> draft logits (n, g, N) = lm_head(h) + Markov bias, over the draft
        vocabulary (N = V at full vocabulary). lm_head(h) is soft-capped only where the layer family caps (Gemma-4,
        before the Markov bias, as the reference and vLLM's Gemma-4 class do); never for Qwen3-shaped drafters, even
        where the target caps (Gemma-2): vLLM's Qwen3 DSpark head applies none (docs/targets.md, "What a drafter sees")."""
        base = self.lm_head(h)
        if self.markov_head is None:
            return base
        z = self.markov_head(prev, h)  # (N, g, r)
        return base + self.markov_head.markov_w2(z.to(base.dtype))

    def confidence_logits(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        """h (N, g, d), prev (N, g) -> confidence logits (N, g), or None without the head."""
        if self.confidence_head is None:
            return None
        with_markov = self.markov_head is not None and self.cfg.confidence_head_with_markov
        return self.confidence_head(h, self.markov_head.embed_prev(prev) if with_markov else None)
