"""One cached sample: what is stored, and the codec between tensors and stored bytes.

Per sample of S tokens with P supervised positions (P = number of p with loss_mask[p+1] = 1):

    input_ids     int32 [S]
    loss_mask     uint8 [S]          1 on assistant (trained) tokens
    hidden        [S, L, d]          the L selected layers' outputs, in the storage dtype
    final_hidden  [P, d]             final-norm hidden state, only where a label can need it
    topk_ids      int32 [P, k]       optional: target top-k token ids at the same positions
    topk_logprobs fp32  [P, k]       optional: their log-probabilities

Why only P rows of the final hidden state: it exists to recover the target's distribution over
the *next* token, and a drafter is only ever trained to predict a loss-masked next token. The
positions are derived from loss_mask, so they are not stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepspec.data.cache import quantize


class CorruptRecordError(ValueError):
    """A stored record whose parts do not fit together."""


@dataclass
class CacheRecord:
    """A sample as stored: plain arrays and byte blobs (see the module docstring for shapes)."""

    sample_id: str
    input_ids: np.ndarray  # int32 [S]
    loss_mask: np.ndarray  # uint8 [S]
    hidden: bytes
    hidden_scale: bytes
    final_hidden: bytes
    final_scale: bytes
    topk_ids: bytes = b""
    topk_logprobs: bytes = b""

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def nbytes(self) -> int:
        return (self.input_ids.nbytes + self.loss_mask.nbytes + len(self.hidden) + len(self.hidden_scale)
                + len(self.final_hidden) + len(self.final_scale) + len(self.topk_ids) + len(self.topk_logprobs))


def supervised_positions(loss_mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Positions p whose next token is supervised: loss_mask[p + 1] == 1.  (S,) -> (P,) int64."""
    m = torch.as_tensor(np.asarray(loss_mask))
    return torch.nonzero(m[1:] != 0, as_tuple=False).flatten()


@dataclass(frozen=True)
class RecordCodec:
    """Turns target outputs into CacheRecords and back, for one cache's fixed layout."""

    storage_dtype: str
    num_layers: int
    hidden_size: int
    topk: int = 0

    def encode(self, sample_id: str, input_ids: torch.Tensor, loss_mask: torch.Tensor, layer_hidden: torch.Tensor,
               final_hidden: torch.Tensor, logits_topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> CacheRecord:
        """input_ids, loss_mask (S,); layer_hidden (S, L*d); final_hidden (S, d); logits_topk ((P,k) ids, (P,k) logprobs)."""
        S, d, L = input_ids.shape[0], self.hidden_size, self.num_layers
        pos = supervised_positions(loss_mask)
        hid, hid_scale = quantize.encode(layer_hidden.reshape(S, L, d), self.storage_dtype)
        fin, fin_scale = quantize.encode(final_hidden[pos].reshape(-1, 1, d), self.storage_dtype)
        ids_b = lps_b = b""
        if self.topk:
            ids, lps = logits_topk
            ids_b = ids.to(torch.int32).contiguous().numpy().tobytes()
            lps_b = lps.float().contiguous().numpy().tobytes()
        return CacheRecord(sample_id, input_ids.to(torch.int32).numpy(), loss_mask.to(torch.uint8).numpy(),
                           hid, hid_scale, fin, fin_scale, ids_b, lps_b)

    def decode(self, rec: CacheRecord, out_dtype: torch.dtype = torch.float32, dense_final: bool = True) -> dict:
        """CacheRecord -> tensors.

        Returns a dict with ``input_ids`` (S,) int64, ``loss_mask`` (S,) uint8, ``hidden`` (S, L*d),
        ``final_hidden`` ((S, d) zero where not stored if dense_final, else (P, d)),
        ``final_positions`` (P,), and ``topk_ids``/``topk_logprobs`` (P, k) when stored.
        """
        S, d, L = rec.num_tokens, self.hidden_size, self.num_layers
        if len(rec.loss_mask) != S:
            raise CorruptRecordError(f"sample {rec.sample_id}: {S} input ids but {len(rec.loss_mask)} loss-mask entries")
        pos = supervised_positions(rec.loss_mask)
        P = len(pos)
        try:
            hidden = quantize.decode(rec.hidden, rec.hidden_scale, (S, L, d), self.storage_dtype, out_dtype)
            final = quantize.decode(rec.final_hidden, rec.final_scale, (P, 1, d), self.storage_dtype, out_dtype)
        except ValueError as e:
            raise CorruptRecordError(f"sample {rec.sample_id}: {e}") from e
        if not (torch.isfinite(hidden).all() and torch.isfinite(final).all()):
            raise CorruptRecordError(f"sample {rec.sample_id}: non-finite hidden-state values")
        out = {"sample_id": rec.sample_id, "input_ids": torch.from_numpy(rec.input_ids.astype(np.int64)),
               "loss_mask": torch.from_numpy(rec.loss_mask.copy()), "hidden": hidden.reshape(S, L * d),
               "final_positions": pos}
        final = final.reshape(P, d)
        if dense_final:
            dense = torch.zeros(S, d, dtype=out_dtype)
            dense[pos] = final
            final = dense
        out["final_hidden"] = final
        if self.topk:
            k = self.topk
            if len(rec.topk_ids) != P * k * 4 or len(rec.topk_logprobs) != P * k * 4:
                raise CorruptRecordError(f"sample {rec.sample_id}: top-k blobs do not hold {P}x{k} entries")
            if P == 0:  # torch.frombuffer refuses an empty buffer
                out["topk_ids"], out["topk_logprobs"] = torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
            else:
                out["topk_ids"] = torch.frombuffer(bytearray(rec.topk_ids), dtype=torch.int32).view(P, k).long()
                out["topk_logprobs"] = torch.frombuffer(bytearray(rec.topk_logprobs), dtype=torch.float32).view(P, k)
        return out

    def bytes_per_token(self, supervised_fraction: float) -> float:
        """Formula: bytes per token of a record, before container overhead and compression."""
        d, L = self.hidden_size, self.num_layers
        per_sup = quantize.row_bytes(self.storage_dtype, d) + self.topk * 8
        return 4 + 1 + L * quantize.row_bytes(self.storage_dtype, d) + supervised_fraction * per_sup
