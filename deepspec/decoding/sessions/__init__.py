"""Drafter sessions: one per drafter, each holding incremental state for a batch of rows.

Interface (every session):

    extend(features (B, T, L*d), tokens (B, T), valid (B, T))   queue verified tokens per row
    draft(rows (N,), anchors (N,), sampling, generator) -> Draft  one block for each listed row
    propose(rows (N,), anchors (N,)) -> Proposal                 optional: training-free proposals before the
                                                                 gate (``lookup.HybridSession``)

A round's drafter work is O(block + tokens verified since the row last drafted), never
O(context): the context's per-layer keys/values are cached like the target's KV cache.
"""
from __future__ import annotations

from deepspec.decoding.sessions.draft import Draft
from deepspec.decoding.sessions.dflash import DFlashSession
from deepspec.decoding.sessions.dspark import DSparkSession
from deepspec.decoding.sessions.eagle3 import Eagle3Session


def make_session(drafter, batch_size: int = 1):
    """The session matching a drafter module, for ``batch_size`` rows."""
    from deepspec.drafters import DFlashDrafter, DSparkDrafter, Eagle3Drafter

    for cls, session in ((DSparkDrafter, DSparkSession), (DFlashDrafter, DFlashSession), (Eagle3Drafter, Eagle3Session)):
        if isinstance(drafter, cls):
            return session(drafter, batch_size)
    raise TypeError(f"no decoding session for {type(drafter).__name__}")


__all__ = ["DFlashSession", "DSparkSession", "Draft", "Eagle3Session", "make_session"]
