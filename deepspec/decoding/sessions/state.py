"""Per-row incremental state shared by every drafter session.

A session serves a batch of B rows (requests). Each row owns a context: the target features of
the tokens verified so far, *before* its anchor (the last emitted token, whose features do not
exist yet). Sessions never cache speculative positions, so a rejection needs no crop: the loop
hands ``extend`` only what the target verified and accepted.

``extend`` is lazy: it queues the features and ``take_pending`` hands a row's queue to the next
draft of that row, packed to the left. When the scheduler decodes plainly for a while, the
drafter pays for the skipped tokens once, in one batched pass, when it drafts again.
"""
from __future__ import annotations

import torch


class PendingFeatures:
    """Verified (features, token) pairs queued per row until that row drafts again."""

    def __init__(self) -> None:
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (B, T, F), (B, T), valid (B, T)
        self._queued: torch.Tensor | None = None  # (B,) entries per row in ``chunks[:_counted]`` (``queued``)
        self._counted = 0

    def add(self, features: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """features (B, T, F), tokens (B, T), valid (B, T) bool: which (row, slot) pairs are new, in order.
        Just a list append: it runs in every plain round of the loop (whether the queue needs packing is
        asked once, when a draft takes it)."""
        self.chunks.append((features, tokens, valid))

    def queued(self, rows: torch.Tensor) -> torch.Tensor:
        """Entries queued per row of ``rows`` (N,) -> (N,). Counted lazily, the chunks added since the last call only
        (the gate asks rarely: ``DraftGate`` prices a probe's catch-up by it)."""
        if not self.chunks:
            return torch.zeros_like(rows)
        if self._queued is None:
            self._queued = torch.zeros(self.chunks[0][2].shape[0], dtype=torch.long, device=rows.device)
        for _, _, valid in self.chunks[self._counted:]:
            self._queued += valid.sum(1)
        self._counted = len(self.chunks)
        return self._queued[rows]

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove and return the queue of ``rows`` (N,), packed left: features (N, T, F), tokens (N, T), counts (N,)."""
        self._queued, self._counted = None, 0  # recounted when next asked (taking rebuilds the chunks)
        if not self.chunks:
            return torch.zeros(len(rows), 0, 0), torch.zeros(len(rows), 0, dtype=torch.long), torch.zeros_like(rows)
        every_row = len(rows) == self.chunks[0][2].shape[0]  # the usual case: all rows draft (rows are sorted, unique)
        if every_row and all(bool(c[2].all()) for c in self.chunks):  # already packed (a batch of one always is)
            feats, toks = [c[0] for c in self.chunks], [c[1] for c in self.chunks]
            self.chunks = []
            if len(feats) == 1:  # the usual queue: one round's tokens, handed over without a copy
                return feats[0], toks[0], torch.full_like(rows, toks[0].shape[1])
            feats, toks = torch.cat(feats, dim=1), torch.cat(toks, dim=1)
            return feats, toks, torch.full_like(rows, toks.shape[1])
        pick = (lambda t: t) if every_row else (lambda t: t[rows])
        feats = torch.cat([pick(c[0]) for c in self.chunks], dim=1)
        toks = torch.cat([pick(c[1]) for c in self.chunks], dim=1)
        valid = torch.cat([pick(c[2]) for c in self.chunks], dim=1)
        if every_row:
            self.chunks = []
        else:
            # the taken rows' entries leave the queue; a new valid mask per chunk, never written in place (a plain
            # round queues a view of the loop's own ``active`` mask)
            self.chunks = [(f, t, v.index_put((rows,), torch.tensor(False))) for f, t, v in self.chunks]
            self.chunks = [c for c in self.chunks if bool(c[2].any())]
        counts = valid.sum(1)
        T = int(counts.max()) if len(rows) else 0
        slot = valid.long().cumsum(1) - 1  # (N, T_all) destination of each valid entry
        r, t = valid.nonzero(as_tuple=True)
        packed_f = feats.new_zeros(len(rows), T, feats.shape[-1])
        packed_t = toks.new_zeros(len(rows), T)
        packed_f[r, slot[r, t]] = feats[r, t]
        packed_t[r, slot[r, t]] = toks[r, t]
        return packed_f, packed_t, counts


class IncrementalSession:
    """What every drafter session shares: per row, the length of its cached context and the queue of
    verified tokens not yet appended (``extend``; the drafter appends them at the row's next draft)."""

    def __init__(self, drafter, batch_size: int, block_size: int):
        self.d, self.g = drafter, block_size
        self.length = torch.zeros(batch_size, dtype=torch.long, device=drafter.fc.weight.device)  # cached positions per row
        self.dtype = drafter.fc.weight.dtype  # the queue's features are cast to it (read once: extend runs every round)
        self.pending = PendingFeatures()

    @property
    def block_size(self) -> int:
        return self.g

    def catch_up_tokens(self, rows: torch.Tensor) -> int:
        """Queued positions the next draft of ``rows`` (N,) runs through the drafter before its block: N x the
        longest queue among them (the pass is padded to it). After plain rounds this is the switch's cost."""
        return len(rows) * int(self.pending.queued(rows).max()) if len(rows) else 0

    def extend(self, features: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Queue verified tokens: features (B, T, L*d), the tokens at the same positions (B, T), valid (B, T).
        No tensor work beyond a dtype cast (none when the dtypes match) and no inference-mode context of its
        own (the loop runs in one): it runs every round, drafted or not."""
        self.pending.add(features if features.dtype == self.dtype else features.to(self.dtype), tokens, valid)


class RaggedKV:
    """One layer's cached keys/values for B rows of different lengths: (B, Hkv, capacity, hd).

    Row b holds positions 0..lengths[b]-1; ``write`` puts new entries at each row's own offset
    (no holes: unlike the target's batched cache, the drafter's keys are written by index).
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, dtype, device, capacity: int = 256):
        self.k = torch.zeros(batch, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Entry i goes to row rows[i], slot positions[i]: rows, positions (M,); k, v (M, Hkv, hd);
        ``length`` = the longest row after the write (grows the buffer geometrically: amortised O(1) per token)."""
        self._reserve(length)
        self.k[rows, :, positions] = k
        self.v[rows, :, positions] = v

    def write_slots(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Every row's entries at the same slots start..start+T-1: k, v (B, Hkv, T, hd)."""
        self._reserve(start + k.shape[2])
        self.k[:, :, start : start + k.shape[2]] = k
        self.v[:, :, start : start + k.shape[2]] = v

    def _reserve(self, length: int) -> None:
        if length > self.k.shape[2]:
            extra = max(length, 2 * self.k.shape[2]) - self.k.shape[2]
            pad = self.k.new_zeros(self.k.shape[0], self.k.shape[1], extra, self.k.shape[3])
            self.k, self.v = torch.cat([self.k, pad], 2), torch.cat([self.v, pad.clone()], 2)

    def read(self, rows: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of ``rows`` (N,) (None = every row, a view) up to ``length`` slots: (N, Hkv, length, hd) each.
        Slots past a row's length are scratch: a round writes its block's keys there."""
        self._reserve(length)
        if rows is None:
            return self.k[:, :, :length], self.v[:, :, :length]
        return self.k[rows, :, :length], self.v[rows, :, :length]


def scatter_index(rows: torch.Tensor, start: torch.Tensor, counts: torch.Tensor, T: int) -> tuple[torch.Tensor, ...]:
    """Where a packed (N, T) chunk of new entries goes: row i's first counts[i] entries, at start[i], start[i]+1, ...

    Returns (entry row n, entry column t, destination row, destination slot), each (M,), M = counts.sum().
    """
    steps = torch.arange(T, device=counts.device)
    n, t = (steps[None] < counts[:, None]).nonzero(as_tuple=True)
    return n, t, rows[n], start[n] + t


def all_rows(rows: torch.Tensor, batch: int) -> bool:
    """True when ``rows`` lists every row of the batch (reads can then be views). Sessions take ``rows`` sorted and
    unique (the loop's ``active.nonzero()``), so their number says it: no comparison to dispatch every round."""
    return len(rows) == batch
