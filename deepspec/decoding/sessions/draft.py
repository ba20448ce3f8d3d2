"""What a session proposes for a round, and the block-backbone state DSpark and DFlash share."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deepspec.decoding.sessions.state import IncrementalSession, RaggedKV, all_rows, scatter_index


@dataclass
class Draft:
    tokens: torch.Tensor
    """(N, g) drafted tokens d_1..d_g per row."""
    q: torch.Tensor | None
    """(N, g, V) the distributions the tokens were sampled from (None when greedy)."""
    confidence: torch.Tensor
    """(N, g) raw per-slot confidence c_k, a function of d_1..d_{k-1} only (never of d_k: see
    ``top_probability``): DSpark's confidence head; DFlash/Eagle3 the drafter's top probability at
    slot k (softmax at T=1). Uncalibrated: the scheduler applies STS."""
    source: torch.Tensor | None = None
    """(N,) where each row's block came from (``sessions.lookup``: PLAIN, LOOKUP, MODEL); None = the drafter for all."""

    def verified_q(self, W: int) -> torch.Tensor | None:
        """(N, W-1, V): the laws of slots 1..W-1, those a round of width W verifies (None when greedy)."""
        return None if self.q is None else self.q[:, : W - 1]


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> max_v softmax(logits)[v] (...), fp32: a drafter's own confidence at a slot.

    Deliberately *not* the probability of the drafted token: the decision to verify slot k may use
    anything known before d_k is drawn (earlier drafts, the slot's distribution), never d_k itself.
    Choosing L from q_k(d_k) biases the output law (chi-square p < 1e-50 in tests/test_exact_law.py).
    """
    return torch.softmax(logits.float(), -1).amax(-1)


class BlockBackboneSession(IncrementalSession):
    """The block backbone over a cached context (DSpark, DFlash): per layer a RaggedKV of the context."""

    def __init__(self, drafter, batch_size: int):
        super().__init__(drafter, batch_size, drafter.cfg.block_size)
        attn, w = drafter.layers[0].self_attn, drafter.fc.weight  # the draft layers' K/V shape (Gemma-4's is not the target's)
        self.kv = [RaggedKV(batch_size, attn.num_kv_heads, attn.head_dim, w.dtype, w.device) for _ in drafter.layers]

    def _context(self, rows: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Append the rows' queued features to the cache -> per-layer (k, v) (N, Hkv, C+g, hd), whose last g
        slots are free for the block's own keys, and the context's valid (N, C)."""
        feats, _, counts = self.pending.take(rows)
        start = self.length[rows]
        lengths = start + counts
        C = int(lengths.max())
        T = feats.shape[1]
        if T:
            pos = start[:, None] + torch.arange(T, device=feats.device)  # (N, T) positions of the new tokens
            kv = self.d.context_kv(feats, pos)
            if len(self.length) == 1:  # a batch of one: its T new entries are slots C-T..C-1, one slice per tensor
                for cache, (k, v) in zip(self.kv, kv):
                    cache.write_slots(C - T, k, v)
            else:
                n, t, b, p = scatter_index(rows, start, counts, T)
                for cache, (k, v) in zip(self.kv, kv):
                    cache.write(b, p, k[n, :, t], v[n, :, t], C)
            self.length[rows] = lengths
        view = None if all_rows(rows, len(self.length)) else rows
        return [c.read(view, C + self.g) for c in self.kv], torch.arange(C, device=lengths.device) < lengths[:, None]

    def block_hidden(self, rows: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """One backbone pass over [anchor, MASK x (g-1)] for every row: -> h (N, g, d)."""
        ctx, ctx_valid = self._context(rows)
        N, g = len(rows), self.g
        ids = torch.full((N, g), self.d.cfg.mask_token_id, dtype=torch.long, device=ctx_valid.device)
        ids[:, 0] = anchors
        pos = self.length[rows, None] + torch.arange(g, device=ids.device)  # the anchor sits at position = context length
        # (N, 1, g, C+g): a block sees its row's whole context (every token before its anchor) and itself
        mask = torch.cat([ctx_valid[:, None, :].expand(N, g, -1), ctx_valid.new_ones(N, g, g)], dim=-1)[:, None]
        return self.d.block_hidden(ids, pos, ctx, mask, backend="sdpa", decoding=True)  # g queries: flex gains nothing here
