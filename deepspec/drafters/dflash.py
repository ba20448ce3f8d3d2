"""DFlash: the block-parallel backbone alone; every draft token comes from one parallel pass.

    h        = backbone(target features, [anchor, MASK, ...])         (B, A, g, d)
    logits_k = lm_head(h_k)                                           trained with CE only
                                                                      (B, A, g, N), N = draft vocabulary

It is DSpark without the sequential and confidence heads: the baseline that shows what they add.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from deepspec.drafters.block_backbone import BlockDraftBackbone, init_trainable
from deepspec.drafters.draft_vocab import DraftVocab


@dataclass
class DFlashConfig:
    """Drafter hyper-parameters (the target's shape comes from its HF config)."""

    block_size: int = 7
    """Draft tokens per block (gamma); the anchor slot predicts too."""
    num_hidden_layers: int = 2
    """Backbone decoder layers."""
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


class DFlashDrafter(BlockDraftBackbone):
    def __init__(self, cfg: DFlashConfig, target_config, embed_tokens: nn.Embedding, lm_head: nn.Linear | None,
                 draft_vocab: DraftVocab | None = None):
        super().__init__(cfg.num_hidden_layers, cfg.target_layer_ids, cfg.attention_backend, target_config, embed_tokens, lm_head,
                         draft_vocab)
        self.cfg = cfg
        self.apply(init_trainable)

    def logits(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """h (n, g, d) -> (n, g, N) over the draft vocabulary (N = V at full vocabulary); prev is unused. Soft-capped
        only for Gemma-4 (its family's head); vLLM's Qwen3 DFlash head applies no cap (docs/targets.md)."""
        return self.lm_head(h)

    def confidence_logits(self, h: torch.Tensor, prev: torch.Tensor) -> None:
        return None
