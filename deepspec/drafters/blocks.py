"""Block-parallel drafting in training: anchors, block inputs/labels and the attention mask.

A block anchored at position a drafts the tokens at a+1 .. a+gamma from the inputs
[token_a, MASK, ..., MASK] at positions a .. a+gamma-1. It sees the target's context features
at positions < a (strictly: the anchor enters through its token embedding only) and the whole of
its own block (bidirectional). Slot k is supervised while its label a+1+k is inside the sequence
and loss-masked, cumulatively along the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Blocks:
    """Per batch: A anchors per sample (padded; ``keep`` marks real ones), block size g."""

    anchors: torch.Tensor  # (B, A) int64 anchor positions (0 where not kept)
    keep: torch.Tensor  # (B, A) bool
    input_ids: torch.Tensor  # (B, A, g) [token_a, MASK, ...]
    labels: torch.Tensor  # (B, A, g) token at a+1+k (0 where out of range)
    label_valid: torch.Tensor  # (B, A, g) bool, cumulative validity
    positions: torch.Tensor  # (B, A, g) a + k

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[-1]


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S) bool: a is a candidate when loss_mask[a] and loss_mask[a+1] are set."""
    m = loss_mask.bool()
    cand = torch.zeros_like(m)
    cand[:, :-1] = m[:, :-1] & m[:, 1:]
    return cand


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, seeds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` candidates per sample, uniformly without replacement, sorted.

    ``seeds`` (one per sample) make the draw a function of the sample alone, whatever batch,
    rank or micro-step it lands in. Returns anchors (B, A) and keep (B, A) with
    A = min(num_anchors, most candidates in a sample).
    """
    cand = anchor_candidates(loss_mask)
    B, S = cand.shape
    if seeds is None:
        keys = torch.rand(B, S)
    else:
        keys = torch.stack([torch.rand(S, generator=torch.Generator().manual_seed(s)) for s in seeds])
    keys = keys.to(cand.device)
    keys = torch.where(cand, keys, torch.full_like(keys, 2.0))  # non-candidates sort last
    A = max(1, min(num_anchors, int(cand.sum(1).max())))
    picked = keys.topk(A, dim=1, largest=False).indices  # (B, A)
    keep = torch.gather(cand, 1, picked)
    anchors = torch.where(keep, picked, torch.zeros_like(picked))
    anchors, order = torch.sort(torch.where(keep, anchors, torch.full_like(anchors, S)), dim=1)
    keep = torch.gather(keep, 1, order)
    return torch.where(keep, anchors, torch.zeros_like(anchors)), keep


def make_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor,
                block_size: int, mask_token_id: int) -> Blocks:
    """Block inputs, labels and cumulative validity for the given anchors. input_ids/loss_mask (B, S)."""
    B, S = input_ids.shape
    k = torch.arange(block_size, device=input_ids.device)
    positions = anchors[:, :, None] + k  # (B, A, g)
    label_pos = positions + 1
    inside = label_pos < S
    idx = label_pos.clamp(max=S - 1).flatten(1)
    labels = torch.gather(input_ids, 1, idx).view_as(positions)
    label_mask = torch.gather(loss_mask.bool(), 1, idx).view_as(positions)
    valid = (inside & label_mask & keep[:, :, None]).int().cumprod(dim=-1).bool()
    block_in = torch.full_like(positions, mask_token_id)
    block_in[:, :, 0] = torch.gather(input_ids, 1, anchors)
    return Blocks(anchors, keep, block_in, torch.where(inside, labels, torch.zeros_like(labels)), valid, positions)


def block_attention_mask(anchors: torch.Tensor, ctx_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, A*g, S + A*g): context keys < anchor (and not padding), own block.

    ctx_valid (B, S) marks real (non-padding) context positions.
    """
    B, A = anchors.shape
    S = ctx_valid.shape[1]
    q_anchor = anchors.repeat_interleave(block_size, dim=1)  # (B, Q) anchor of each query
    ctx = (torch.arange(S, device=anchors.device)[None, None, :] < q_anchor[:, :, None]) & ctx_valid[:, None, :].bool()
    q_block = torch.arange(A * block_size, device=anchors.device) // block_size
    own = q_block[:, None] == q_block[None, :]  # (Q, Q)
    return torch.cat([ctx, own.expand(B, -1, -1)], dim=-1)[:, None]  # (B, 1, Q, S+Q)


def flex_mask_mod(anchors: torch.Tensor, ctx_valid: torch.Tensor, block_size: int):
    """The same mask as ``block_attention_mask``, as a flex-attention mask_mod."""
    S = ctx_valid.shape[1]
    ctx_valid = ctx_valid.bool()

    def mask_mod(b, h, q_idx, kv_idx):
        a = anchors[b, q_idx // block_size]
        in_ctx = kv_idx < S
        ctx_ok = (kv_idx < a) & ctx_valid[b, kv_idx.clamp(max=S - 1)]
        blk_ok = (kv_idx - S) // block_size == q_idx // block_size
        return torch.where(in_ctx, ctx_ok, blk_ok)

    return mask_mod
