"""Typed config of the decoding engine's verification policy (``deepspec.decoding.scheduler``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

POLICIES = ("fixed", "threshold", "scheduled", "scheduled_with_draft_cost", "lookup", "hybrid", "lookup_rule")
LOOKUP_POLICIES = ("lookup", "hybrid", "lookup_rule")  # the policies that run the training-free proposer
CONFIDENCE_SOURCES = ("drafter", "online")


@dataclass
class ScheduleConfig:
    """Verification-length policy of the decoding engine."""

    policy: str = "fixed"
    """fixed | threshold (static, per row) | scheduled (Algorithm 1) | scheduled_with_draft_cost (Algorithm 1 +
    draft cost + plain fallback)."""
    fixed_length: int = 0
    """fixed: drafts verified per round (0 = the whole block)."""
    threshold: float = 0.5
    """threshold: verify each row's leading drafts whose calibrated cumulative survival is >= this."""
    confidence: str = "drafter"
    """drafter: the session's confidences (DSpark's head; DFlash/Eagle3 their top probability at the slot,
    never the drafted token's own), STS-calibrated | online: per-row running acceptance per slot (EMA of
    observed outcomes)."""
    temperatures: Optional[list[float]] = None
    """STS temperatures per slot; None = the drafter's saved ones (``confidence_temperatures.json``)."""
    online_ema: float = 0.3
    """online: weight of the newest observation."""
    probe_budget: float = 0.005
    """scheduled_with_draft_cost: while plain decoding wins, the fraction of wall time the engine may
    lose to probing drafts (which tell it when drafting pays again). A probe after plain rounds also
    builds the drafter's context of every skipped token (4-5 plain steps at 16 rows on the toy target),
    so it is rare: 2% measured 1.5-1.7% of the wall time lost at 4 and 16 rows; 1% lost 1.0% at every
    load (session 25), which with the loop's own plain-round overhead (~1%) and noise left R = 4 at
    0.96-0.965 of plain. Half that: a change in the text is noticed after twice the plain rounds. Plain time
    also prepays each such probe's predicted catch-up (``DraftGate``): many rows of long contexts probe rarely."""
    draft_margin: float = 0.1
    """scheduled_with_draft_cost: draft only when a drafted round is predicted to emit this fraction more
    tokens per second than a plain step. The prediction rests on medians of a few noisy round times (a
    shared CPU spreads rounds +-15-30%: a median of 9 is uncertain by ~5% per arm), and at break-even the
    plain step is the safe side; where speculation pays (1.5-3x) a 10% margin changes nothing."""
    plain_streak: int = 8
    """scheduled_with_draft_cost: once the gate decides to decode plainly, the next ``plain_streak`` rounds are
    plain without asking it again, and are timed as one observation. A plain round's bookkeeping is Python
    run right after a target step (cold caches: ~60 us per round for the gate's decision and its
    observation, 0.5% of a toy step at R = 1); a streak pays it once. The gate's inputs do not change during
    plain rounds except the debt and the plain arm's timing, so a probe or a return to drafting comes at
    most ``plain_streak - 1`` rounds late. 1 = ask every round."""

    lookup_min_ngram: int = 1
    """lookup/hybrid: the shortest suffix of a row's context (anchor included) matched against its earlier tokens."""
    lookup_max_ngram: int = 4
    """lookup/hybrid: the longest suffix tried first (a longer match predicts the continuation better)."""
    lookup_tokens: int = 10
    """lookup/hybrid: tokens proposed after a match (the verify width is chosen per round, up to this many)."""
    lookup_shared: bool = False
    """lookup/hybrid: also match against every row's tokens in this run (a suffix index shared by the rows and by
    the generations of one scheduler, like Arctic's global tree), after the row's own context."""
    lookup_ema: float = 0.1
    """lookup/hybrid: weight of the newest outcome in the acceptance estimate per (match length, slot)."""

    def problems(self, prefix: str = "") -> list[str]:
        out = []
        if self.policy not in POLICIES:
            out.append(f"{prefix}policy={self.policy!r} is not one of {POLICIES}")
        if self.confidence not in CONFIDENCE_SOURCES:
            out.append(f"{prefix}confidence={self.confidence!r} is not one of {CONFIDENCE_SOURCES}")
        if self.fixed_length < 0:
            out.append(f"{prefix}fixed_length={self.fixed_length} must be >= 0")
        if not 0.0 <= self.threshold <= 1.0:
            out.append(f"{prefix}threshold={self.threshold} must be in [0, 1]")
        if not 0.0 < self.online_ema <= 1.0:
            out.append(f"{prefix}online_ema={self.online_ema} must be in (0, 1]")
        if not 0.0 <= self.probe_budget < 1.0:
            out.append(f"{prefix}probe_budget={self.probe_budget} must be in [0, 1)")
        if self.plain_streak < 1:
            out.append(f"{prefix}plain_streak={self.plain_streak} must be >= 1")
        if not 0.0 <= self.draft_margin < 10.0:
            out.append(f"{prefix}draft_margin={self.draft_margin} must be in [0, 10)")
        if self.lookup_min_ngram < 1:
            out.append(f"{prefix}lookup_min_ngram={self.lookup_min_ngram} must be >= 1")
        if self.lookup_max_ngram < self.lookup_min_ngram:
            out.append(f"{prefix}lookup_max_ngram={self.lookup_max_ngram} must be >= lookup_min_ngram={self.lookup_min_ngram}")
        if self.lookup_tokens < 1:
            out.append(f"{prefix}lookup_tokens={self.lookup_tokens} must be >= 1")
        if not 0.0 < self.lookup_ema <= 1.0:
            out.append(f"{prefix}lookup_ema={self.lookup_ema} must be in (0, 1]")
        if self.temperatures is not None and any(t <= 0 for t in self.temperatures):
            out.append(f"{prefix}temperatures={self.temperatures} must all be > 0")
        return out
