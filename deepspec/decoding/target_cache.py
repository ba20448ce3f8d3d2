"""The target's cache in the batched engine: attention layers keep holes, recurrent layers keep the accepted prefix.

Attention layers (full or sliding) hold one key/value slot per verified position. A row's rejected drafts stay as
holes that the attention mask hides, slots that every row rejected are cropped (``drop_slots``), and once the holes
are a sizeable part of the cache every row's real slots are moved together (``gather_slots``): each later step's
attention and cache copy is over the cache's slots, holes included.

Linear-attention layers (Qwen3.5 / Qwen3-Next gated delta-nets, 3 of every 4 layers) hold no slots but a recurrent
state (B, H, dk, dv) and a short-convolution state (B, C, K): a rejected draft cannot be hidden, it has to be
taken out of the state. The method here keeps the per-position states of the verify pass and selects, per row, the
one after the row's accepted prefix:

    before a target forward of W positions:  recording is on (transformers' past recording for assisted decoding)
    during it:  every linear layer computes the W states token by token (the recurrent form plain decoding uses)
                and keeps [state before, after 1, ..., after W] and its conv inputs [K old columns, W new]
    after it:   ``keep_prefix(kept)`` sets row b's state to entry kept[b] and its conv state to the K columns
                ending there (ragged across rows: kept = 1 + accepted drafts; a finished row has left the
                batch, ``reorder_cache``)

Why this and not the alternatives: snapshot + replay (restore the state before the block, run the accepted tokens
through the linear layers again) costs a second pass over those layers every round, after the accept step and
dependent on it; keeping W states costs W copies of the state for one round and no extra pass, and the selected state
comes from the same per-token recurrence plain decoding runs, so it is plain decoding's state (tests/test_target_cache.py:
1e-5 after generated accept/reject histories). The price is that the verify pass runs the recurrence token by token
instead of transformers' chunked form: on a 2-thread CPU the rollback costs a round 6-9%, the selection itself ~1%
(eval/results/benchmarks/README.md, `decoding_hybrid_cpu_2threads.json`). A GPU would want the per-token states from a
fused kernel; not built here.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin, LinearAttentionLayer

ATTENTION_TYPES = ("full_attention", "sliding_attention")
RECURRENT_TYPES = ("linear_attention",)
"""Layer types whose state this engine rolls back (transformers' ``LinearAttentionLayer`` with past recording)."""
ROLLBACK_TESTED = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
"""Text model types whose linear layers keep per-position states under recording (checked by the exact-law and
state-equality tests). Other families name ``linear_attention`` layers that may cache differently (Mamba-2's SSM,
MiniMax's lightning attention): refused until tested."""


def layer_types(config) -> list[str]:
    """The decoder's layer types ("full_attention" for every layer when the config names none)."""
    cfg = config.get_text_config()
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


def rollback_problem(config) -> str | None:
    """Why the engine cannot verify this target speculatively (a layer it can neither mask nor roll back), or None."""
    model_type, types = config.get_text_config().model_type, layer_types(config)
    unknown = sorted({t for t in types if t not in ATTENTION_TYPES + RECURRENT_TYPES})
    if unknown:
        return f"{model_type}: layers of type {unknown} keep a state this engine cannot roll back to an accepted prefix"
    if any(t in RECURRENT_TYPES for t in types) and model_type not in ROLLBACK_TESTED:
        return (f"{model_type}: its linear-attention layers' rollback is not tested (tested: {', '.join(ROLLBACK_TESTED)}; "
                "deepspec/decoding/target_cache.py)")
    return None


class TargetCache(DynamicCache):
    """A DynamicCache whose attention layers are plain ``DynamicLayer`` (sliding layers too: the engine's explicit masks
    apply the window in logical positions, so a cache that dropped old slots would miscount with holes) and whose
    linear-attention layers can be rolled back per row (module docstring)."""

    def __init__(self, config):
        super().__init__()
        types = layer_types(config)
        self.recurrent = [i for i, t in enumerate(types) if t in RECURRENT_TYPES]
        if self.recurrent:  # otherwise layers are created lazily, as a bare DynamicCache does
            self.layers = [LinearAttentionLayer() if t in RECURRENT_TYPES else DynamicLayer() for t in types]
            self.layer_class_to_replicate = None

    @property
    def has_recurrent_layers(self) -> bool:
        return bool(self.recurrent)

    def record(self, max_width: int) -> None:
        """From now on every forward keeps the per-position states of up to ``max_width`` new positions, until
        ``keep_prefix`` picks one per row. Call after the prefill (its states need no rollback)."""
        for i in self.recurrent:
            self.layers[i].activate_past_recording(recurrent_states_to_keep=max_width)

    def keep_prefix(self, kept: torch.Tensor) -> None:
        """kept (B,) int or bool: after the last forward of W positions, row b keeps the state after its first kept[b]
        of them (0 = the state before the forward). A no-op without recurrent layers or outside recording (it runs
        every round: no decorator, no conversion before that check)."""
        if not self.recurrent:
            return
        kept = kept.long()
        back = None  # [(row, kept)] of the rows that did not keep every position: computed once, on the host
        for i in self.recurrent:
            layer = self.layers[i]
            if not layer.record_past:
                continue
            for s in range(layer.number_of_states):
                if layer.is_conv_states_initialized[s]:
                    self._keep_conv(layer, s, kept)
                if layer.is_recurrent_states_initialized[s]:
                    history = layer.recurrent_states_history[s]  # W states: before the forward, after 1, .., W-1
                    if back is None:
                        back = [(b, k) for b, k in enumerate(kept.tolist()) if k < len(history)]
                    self._keep_recurrent(layer.recurrent_states[s], history, back)
                    layer.recurrent_states_history[s] = []  # a new list: transformers shares one between states

    @staticmethod
    def _keep_recurrent(current: torch.Tensor, history: list[torch.Tensor], back: list[tuple[int, int]]) -> None:
        """current (B, H, dk, dv) is the state after all W positions: a row that kept them all keeps it (no copy), a row
        that kept k < W gets history[k]'s row, written in place (transformers copies into this tensor next forward).
        One row copy per rejecting row, not a stack of W+1 states of every row: at Qwen3.5-27B's 48 value heads a
        state is 3 MB per row and layer."""
        for b, k in back:
            current[b].copy_(history[k][b])

    @staticmethod
    def _keep_conv(layer: LinearAttentionCacheLayerMixin, s: int, kept: torch.Tensor) -> None:
        """The conv state grew to (B, C, K + W) during recording: row b keeps the K columns ending after kept[b]."""
        full, K = layer.conv_states[s], layer.conv_kernel_size[s]
        cols = kept[:, None, None] + torch.arange(K, device=full.device)  # (B, 1, K)
        layer.conv_states[s] = full.gather(2, cols.expand(-1, full.shape[1], -1))

    def gather_slots(self, slots: torch.Tensor) -> None:
        """slots (B, C') long: row b's new slot j is its old slot ``slots[b, j]`` in every attention layer (the batched
        engine's compaction: each row's real slots, in order, without the holes between them). Keys carry their
        rotary positions already and attention reads slots under the mask, so moving a slot changes no output as
        long as each row keeps their order (a sliding window counts positions along the slots). Recurrent layers
        have no slots."""
        for i, layer in enumerate(self.layers):
            if i in self.recurrent or not layer.is_initialized or layer.keys.numel() == 0:
                continue  # a layer that shares another's KV (Gemma-3n/4) holds none of its own
            index = slots[:, None, :, None]
            layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))

    def drop_slots(self, n: int) -> None:
        """Crop the last ``n`` slots of the attention layers (the slots no row kept). Recurrent layers have no
        slots: ``keep_prefix`` has already put their states where each row's prefix ends."""
        if n > 0:
            for i, layer in enumerate(self.layers):
                if i not in self.recurrent:
                    layer.crop(-n)
