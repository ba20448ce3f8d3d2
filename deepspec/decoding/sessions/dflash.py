"""DFlash at inference: one parallel backbone pass, every slot sampled from it alone (in the draft
vocabulary; the Draft carries target ids and q over the full vocabulary, zeros outside it)."""
from __future__ import annotations

import torch

from deepspec.decoding.sessions.draft import BlockBackboneSession, Draft, top_probability
from deepspec.decoding.verify import SamplingConfig, sample


class DFlashSession(BlockBackboneSession):
    @torch.inference_mode()
    def draft(self, rows: torch.Tensor, anchors: torch.Tensor, sampling: SamplingConfig, generator) -> Draft:
        """rows (N,), anchors (N,) -> a block of g drafts per row."""
        logits = self.d.lm_head(self.block_hidden(rows, anchors))  # (N, g, V_draft)
        q = sampling.probs(logits)
        tokens = self.d.draft_to_target(sample(q, generator))  # (N, g) target ids
        return Draft(tokens, None if sampling.greedy else self.d.to_target_vocab(q), top_probability(logits))
