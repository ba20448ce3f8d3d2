"""DFlash at inference: one parallel backbone pass, every slot sampled from it alone."""
from __future__ import annotations

import torch

from deepspec.decoding.sessions.draft import BlockBackboneSession, Draft, top_probability
from deepspec.decoding.verify import SamplingConfig, sample


class DFlashSession(BlockBackboneSession):
    @torch.no_grad()
    def draft(self, rows: torch.Tensor, anchors: torch.Tensor, sampling: SamplingConfig, generator) -> Draft:
        """rows (N,), anchors (N,) -> a block of g drafts per row."""
        logits = self.d.lm_head(self.block_hidden(rows, anchors))  # (N, g, V)
        q = sampling.probs(logits)
        tokens = sample(q, generator)  # (N, g)
        return Draft(tokens, None if sampling.greedy else q, top_probability(logits))
