"""The speculative decoding loop and the plain autoregressive baseline, batched over rows.

One round, after speculative sampling (Leviathan et al. 2023, Chen et al. 2023) with DSpark's
confidence-scheduled verification (Algorithm 1), for the R active rows at once:

    0. gate      with ``scheduled_with_draft_cost``, when drafting cannot pay for itself now the round
                 is one plain decoding step (the baseline's own step function) and nothing below runs;
                 with a lookup proposer (``sessions.lookup``) its proposals come first (when the scheduler
                 may use them: ``wants_proposal``) and the gate picks each row's source: plain, the lookup's
                 proposal or the drafter's block
    1. draft     one drafter pass proposes d_1..d_g after each row's anchor (the last emitted token),
                 from the drafter's cached context (``sessions``); lookup rows carry their proposal, q one-hot
    2. schedule  drafts verified per row, L_r in 0..g (fixed, or Algorithm 1 on calibrated survival)
    3. verify    one target forward over [anchor, d_1..d_L] of every row, padded to W = 1 + max L
    4. accept    ``verify_block``: per row the accepted prefix d_1..d_m and the next token (a
                 correction from the residual, or the bonus token after the last verified draft)
    5. commit    the rows' rejected positions become holes in the target's KV cache (the slots every
                 row rejected are cropped, so a batch of one has none), and a hybrid target's recurrent
                 layers keep each row's state after its accepted prefix (``target_cache``); the drafter
                 queues the accepted tokens' target features; the next token becomes the anchor

A single prompt is the batch of one. Rows stop at ``max_new_tokens`` or after emitting
``eos_token_id``; a finished row leaves the target's batch at once (``_stop``), as a serving engine
retires a finished request: the target's tensors (cache, mask, lengths) hold the active rows only, so a
round costs what its R active rows cost. The drafter's session and the scheduler keep their rows of the
whole batch and are addressed by the original row ids (``rows``).

The batched KV cache grows by up to W positions per round for every row; positions a row did not
accept, while another row kept them, stay as holes that the attention mask hides, and explicit position ids count only a row's
real tokens, so each row computes exactly what it would alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from deepspec.decoding.scheduler import ScheduleConfig, VerifyScheduler
from deepspec.decoding.sessions import make_session
from deepspec.decoding.sessions.lookup import MODEL, PLAIN
from deepspec.decoding.target_cache import TargetCache, rollback_problem
from deepspec.decoding.verify import SamplingConfig, next_token, verify_block
from deepspec.target import TargetModel


@dataclass
class GenerationResult:
    tokens: list[int]
    accepted_per_round: list[int] = field(default_factory=list)
    """m per round: drafts the target accepted (0 in a plain round)."""
    emitted_per_round: list[int] = field(default_factory=list)
    """Tokens emitted per round (m + 1, less what fell after EOS or max_new_tokens in the last round)."""
    source_per_round: list[int] = field(default_factory=list)
    """Where the round's drafts came from: 0 none (a plain round, or L = 0), 1 the lookup, 2 the drafter
    (``sessions.lookup``: PLAIN, LOOKUP, MODEL)."""
    verified_per_round: list[int] = field(default_factory=list)
    """L per round: drafts verified (0 = a plain step)."""
    confidences: list[list[float]] = field(default_factory=list)
    """Raw per-slot confidences c_1..c_g of every drafted round (in the order of the drafted rounds)."""
    drafted_verified: list[int] = field(default_factory=list)
    """L of every drafted round, in the order of ``confidences`` (a scheduler may draft, then verify fewer than g,
    or none): slots past L were never verified, so calibration must not count them as rejected."""
    seconds: dict = field(default_factory=lambda: {"prefill": 0.0, "draft": 0.0, "schedule": 0.0, "verify": 0.0, "other": 0.0})
    """Wall time of the whole batch: the prefill, then each part of the rounds (shared by the rows of one
    batch; plain decoding puts its steps under "verify")."""

    @property
    def tau(self) -> float:
        """Tokens emitted per round (per target forward), bonus/correction token included."""
        return sum(self.emitted_per_round) / max(len(self.emitted_per_round), 1)


@dataclass
class _Batch:
    """The target side of a batch: KV cache, attention mask over it, real lengths (over the N active rows, in
    the order of ``rows``), and per row of the whole batch of B its anchor, whether it is active, its result."""

    cache: TargetCache  # the N active rows' keys/values (recurrent states)
    mask: torch.Tensor  # (N, cache length) 1 = a real token of the row, 0 = padding or hole
    lengths: torch.Tensor  # (N,) real tokens per row = position of the anchor
    anchors: torch.Tensor  # (B,) the last emitted token per row; replaced each round, never written in place (the
    # drafter's queue keeps a view of the previous anchors as the tokens of a plain round)
    active: torch.Tensor  # (B,) bool; replaced when rows stop, never written in place (the queue keeps views of it too)
    results: list[GenerationResult]
    rows: torch.Tensor = field(init=False)  # (N,) the active rows' ids in 0..B-1, sorted: kept with ``active``

    def __post_init__(self):
        self.rows = self.active.nonzero()[:, 0]


def _prefill(target: TargetModel, prompts: list[torch.Tensor], sampling: SamplingConfig, generator, max_new_tokens: int,
             eos_token_id: int | None) -> tuple[_Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prefill of every prompt -> the batch, its features (B, P, L*d), ids (B, P) and mask (B, P).
    The rows share one ``seconds`` dict (batch wall time), its "prefill" entry filled here."""
    t = time.perf_counter()
    dev, B = target.device, len(prompts)
    P = max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    mask = torch.zeros(B, P, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token at column P-1
        ids[i, P - len(p):], mask[i, P - len(p):] = p.to(dev), 1
    cache = TargetCache(target.config)
    features, final = target.decoder_with_positions(ids, mask, (mask.cumsum(1) - 1).clamp_min(0), cache)
    first = next_token(target.logits(final[:, -1]), sampling, generator)  # (B,)
    results = [GenerationResult([tok]) for tok in first.tolist()]
    seconds = results[0].seconds
    for res in results[1:]:
        res.seconds = seconds
    batch = _Batch(cache, mask, mask.sum(1), first, torch.ones(B, dtype=torch.bool, device=dev), results)
    _stop(batch, [i for i, tok in enumerate(first.tolist()) if tok == eos_token_id or max_new_tokens <= 1])
    seconds["prefill"] = time.perf_counter() - t
    return batch, features, ids, mask.bool()


def _emit(batch: _Batch, rows: list[int], tokens: list[list[int]], m: list[int], verified: list[int], max_new_tokens: int,
          eos_token_id: int | None, sources: list[int] | None = None) -> None:
    """Append each row's tokens of the round (its m accepted drafts, then the next token) and its per-round
    records; a row stops at EOS or max_new_tokens (what it would have emitted after is dropped). ``sources``: where
    each row's drafts came from (None: the drafter's)."""
    stopped = []
    for r, toks, m_r, L_r, s_r in zip(rows, tokens, m, verified, sources or [MODEL] * len(rows)):
        res = batch.results[r]
        toks = toks[: max_new_tokens - len(res.tokens)]
        if eos_token_id in toks:
            toks = toks[: toks.index(eos_token_id) + 1]
        res.tokens += toks
        res.accepted_per_round.append(m_r)
        res.emitted_per_round.append(len(toks))
        res.verified_per_round.append(L_r)
        res.source_per_round.append(s_r if L_r else PLAIN)
        if toks[-1] == eos_token_id or len(res.tokens) >= max_new_tokens:
            stopped.append(r)
    _stop(batch, stopped)


def _stop(batch: _Batch, stopped: list[int]) -> None:
    """The ``stopped`` rows (ids in 0..B-1) leave the batch: a new ``active`` mask (the old one may be queued in the
    drafter as a plain round's valid mask, so it is never written in place), its ``rows``, and the target's cache,
    mask and lengths without them. A finished row kept in the target's batch would cost every later step as much as
    an active one: rows that copy finish rounds apart, and tails of 2-6 active rows in a batch of 16 made the lookup
    slower than plain decoding at 8-32 rows (eval/results/benchmarks/README.md). Dropping them copies the cache once
    (each step's cache append copies it too)."""
    if stopped:
        active = batch.active.clone()
        active[stopped] = False
        stays = active[batch.rows].nonzero()[:, 0]  # (N',) places of the rows that go on, among the old N
        batch.active, batch.rows = active, active.nonzero()[:, 0]
        if len(stays):  # none left: the loop ends, nothing to copy
            batch.cache.reorder_cache(stays)
            batch.mask, batch.lengths = batch.mask[stays], batch.lengths[stays]
            _compact_holes(batch)  # the slots only the finished rows held are holes now


def _of_every_row(x: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """(N, ...) values of the active ``rows`` -> (B, ...) with zeros for the finished rows (the drafter's session
    keeps every row). ``rows`` are sorted and unique (``active.nonzero()``), so N == B means every row: then ``x``
    itself, no scatter."""
    if len(rows) == B:
        return x
    out = x.new_zeros(B, *x.shape[1:])
    out[rows] = x
    return out


def _of_active_rows(x: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """(B, ...) -> (N, ...) the active ``rows``: the inverse of ``_of_every_row`` (``x`` itself when every row is)."""
    return x if len(rows) == B else x[rows]


def _next_anchors(batch: _Batch, rows: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """(B,) anchors with the active ``rows`` set to ``nxt`` (N,): a new tensor, never the old one written in place
    (the drafter's queue may hold a view of it); ``nxt`` itself when every row is active (no scatter)."""
    return nxt if len(rows) == len(batch.anchors) else batch.anchors.index_put((rows,), nxt)


def _drop_trailing_holes(batch: _Batch, n: int) -> None:
    """Crop the last ``n`` cache slots, which no row kept: rejections are a suffix of each row's block, so the
    slots after the longest kept prefix are holes in every row. A batch of one then never has holes, and
    the target attends over the tokens it emitted, not over every verified draft."""
    if n > 0:
        batch.cache.drop_slots(n)
        batch.mask = batch.mask[:, :-n]


COMPACT_AT = 1 / 16
"""Compact the target's cache once the slots beyond the longest row are this share of it (``_compact_holes``)."""


def _compact_holes(batch: _Batch) -> None:
    """Once holes are ``COMPACT_AT`` of the cache, keep only each row's real slots, in order, right-aligned in a cache
    as long as the longest row. Every later step copies and attends over every slot, holes included: +512 hole slots
    made a plain step of 8-32 copy_edit rows (1,250 slots) 15-38% slower (2 CPU threads, ``scripts/bench_cache_holes.py``),
    and a row's rejected drafts leave up to G holes per round. One compaction costs about one step's cache copy.
    A batch of one never has holes (its rejections are trailing and cropped)."""
    C, longest = batch.mask.shape[1], int(batch.lengths.max())
    if C - longest < max(C * COMPACT_AT, 1):
        return
    _, order = batch.mask.sort(dim=1, stable=True)  # per row: padding and holes first, then its real slots in order
    slots = order[:, C - longest:]  # (B, longest)
    batch.cache.gather_slots(slots)
    batch.mask = batch.mask.gather(1, slots)


def _plain_step(target: TargetModel, batch: _Batch, sampling: SamplingConfig, generator) -> tuple:
    """One plain decoding step of the N active rows: -> layer features (N, 1, L*d) and next tokens (N,).

    The baseline's step and the engine's undrafted rounds are this same function, so a round the
    scheduler decodes plainly costs exactly what plain decoding costs. The caller sets the anchors.
    """
    anchors = _of_active_rows(batch.anchors, batch.rows, len(batch.anchors))
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(anchors), 1)], dim=1)
    layer_hidden, final = target.decoder_with_positions(anchors[:, None], batch.mask, batch.lengths[:, None], batch.cache)
    batch.lengths += 1
    return layer_hidden, next_token(target.logits(final[:, 0]), sampling, generator)


@torch.no_grad()
def check_speculative_support(target: TargetModel) -> None:
    """Refuse, by name, targets the engine cannot verify losslessly: a layer that is neither attention (holes, crops)
    nor a linear-attention layer whose state ``TargetCache`` rolls back per row would keep state from tokens the
    target never emitted."""
    problem = rollback_problem(target.config)
    if problem:
        raise NotImplementedError(f"{problem}; caching features and training work")


@torch.inference_mode()  # no autograd state at all (not just no graph): less work per op in an op-bound loop
def speculative_generate_batch(target: TargetModel, session, prompts: list[torch.Tensor], max_new_tokens: int,
                               sampling: SamplingConfig, eos_token_id: int | None = None,
                               generator: torch.Generator | None = None,
                               scheduler: VerifyScheduler | None = None) -> list[GenerationResult]:
    """Speculative decoding of several prompts ((P_i,) token ids) with one drafter session of ``len(prompts)`` rows."""
    check_speculative_support(target)
    sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)
    batch, features, ids, prompt_mask = _prefill(target, prompts, sampling, generator, max_new_tokens, eos_token_id)
    session.extend(features, ids, prompt_mask)
    batch.cache.record(session.block_size + 1)  # a hybrid target keeps per-position states of each round (commit)
    scheduler = scheduler or VerifyScheduler(ScheduleConfig(), session.block_size)
    scheduler.start(len(prompts), getattr(session, "catch_up_tokens", None))
    seconds = batch.results[0].seconds
    dev, B = target.device, len(prompts)
    propose = getattr(session, "propose", None)  # a lookup proposer's; a drafter alone has none
    model_g = getattr(session, "model_block_size", session.block_size)  # the drafter's block (a lookup's may be wider)
    while len(batch.rows):
        t0 = time.perf_counter()
        rows = batch.rows
        N = len(rows)
        anchors = _of_active_rows(batch.anchors, rows, B)  # (N,)
        wanted = propose is not None and scheduler.wants_proposal(rows)
        proposal = propose(rows, anchors) if wanted else None  # 0. lookup proposals (host side), when they may be used
        draft_now = scheduler.should_draft(rows) if proposal is None else scheduler.should_draft(rows, proposal)
        if not draft_now:  # 0. no source pays now: a plain step
            step_tokens, step_valid = batch.anchors[:, None], batch.active[:, None]  # views: both are replaced, not written
            layer_hidden, nxt = _plain_step(target, batch, sampling, generator)
            batch.cache.keep_prefix(torch.ones_like(nxt))  # hybrid targets: the state after the step
            session.extend(_of_every_row(layer_hidden, rows, B), step_tokens, step_valid)
            batch.anchors = _next_anchors(batch, rows, nxt)
            zeros = [0] * N
            _emit(batch, rows.tolist(), [[tok] for tok in nxt.tolist()], zeros, zeros, max_new_tokens, eos_token_id)
            elapsed = time.perf_counter() - t0
            seconds["verify"] += elapsed  # a plain round counts as a verify of width 1
            scheduler.observe(rows, None, None, elapsed)
            continue
        draft = session.draft(rows, anchors, sampling, generator)  # 1. draft
        sync()
        t1 = time.perf_counter()
        L = scheduler.lengths(rows, draft.confidence, t1 - t0)  # 2. schedule
        W = 1 + int(L.max())
        t2 = time.perf_counter()
        steps = torch.arange(W, device=dev)  # 3. verify [anchor, d_1..d_L] per row
        block = torch.cat([anchors[:, None], draft.tokens[:, : W - 1]], dim=1)  # (N, W)
        batch.mask = torch.cat([batch.mask, (steps <= L[:, None]).long()], dim=1)
        layer_hidden, final = target.decoder_with_positions(block, batch.mask, batch.lengths[:, None] + steps, batch.cache)
        logits = target.logits(final)  # (N, W, V)
        sync()
        t3 = time.perf_counter()
        if W > 1:  # 4. accept
            q = draft.verified_q(W)
            p = logits if sampling.greedy else sampling.probs(logits)  # greedy needs only the argmax
            m, nxt = verify_block(draft.tokens[:, : W - 1], q, p, L, generator, sampling.greedy)
        else:  # a plain step: the "bonus" token of zero drafts
            m, nxt = torch.zeros(N, dtype=torch.long, device=dev), next_token(logits[:, 0], sampling, generator)
        keep = (steps <= m[:, None]).long()  # 5. commit
        batch.mask[:, -W:] = keep  # rejected positions become holes
        kept = keep.sum(1)
        batch.cache.keep_prefix(kept)  # recurrent layers: each row's state after its kept prefix
        widest = int(kept.max())  # the longest kept prefix: later columns are rejected in every row
        _drop_trailing_holes(batch, W - widest)
        session.extend(*(_of_every_row(x[:, :widest], rows, B) for x in (layer_hidden, block, keep.bool())))
        batch.lengths += kept
        _compact_holes(batch)  # after the lengths: a row's real slots are its ``lengths``
        batch.anchors = _next_anchors(batch, rows, nxt)
        rows_l, m_l, L_l, drafts = rows.tolist(), m.tolist(), L.tolist(), block[:, 1:].tolist()
        src_l = [MODEL] * N if draft.source is None else draft.source.tolist()
        tokens = [d[:m_r] + [tok] for d, m_r, tok in zip(drafts, m_l, nxt.tolist())]
        _emit(batch, rows_l, tokens, m_l, L_l, max_new_tokens, eos_token_id, src_l)
        for r, c, L_r, s_r in zip(rows_l, draft.confidence.float().tolist(), L_l, src_l):
            if s_r == MODEL:  # calibration reads the drafter's confidences only
                batch.results[r].confidences.append(c[:model_g])
                batch.results[r].drafted_verified.append(L_r)
        t4 = time.perf_counter()
        scheduler.observe(rows, L, m, t4 - t0)
        seconds["draft"] += t1 - t0
        seconds["schedule"] += t2 - t1
        seconds["verify"] += t3 - t2
        seconds["other"] += t4 - t3
    return batch.results


@torch.inference_mode()  # as the speculative loop: the baseline is timed under the same mode
def autoregressive_generate_batch(target: TargetModel, prompts: list[torch.Tensor], max_new_tokens: int,
                                  sampling: SamplingConfig, eos_token_id: int | None = None,
                                  generator: torch.Generator | None = None) -> list[GenerationResult]:
    """Plain decoding of several prompts with the same sampling transforms (the reference the speculative
    loop must match): one target forward per token for all rows."""
    batch, _, _, _ = _prefill(target, prompts, sampling, generator, max_new_tokens, eos_token_id)
    t1 = time.perf_counter()
    while len(batch.rows):
        rows = batch.rows
        _, nxt = _plain_step(target, batch, sampling, generator)
        batch.anchors = _next_anchors(batch, rows, nxt)
        zeros = [0] * len(rows)  # the engine's plain-round records: 0 drafts accepted and verified
        _emit(batch, rows.tolist(), [[tok] for tok in nxt.tolist()], zeros, zeros, max_new_tokens, eos_token_id)
    batch.results[0].seconds["verify"] = time.perf_counter() - t1
    return batch.results


def speculative_generate(target: TargetModel, drafter_or_session, prompt: torch.Tensor, max_new_tokens: int,
                         sampling: SamplingConfig, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                         scheduler: VerifyScheduler | None = None) -> GenerationResult:
    """One prompt (P,): the batch of one. Takes a drafter module (a fresh session is made) or a session of one row."""
    session = drafter_or_session if hasattr(drafter_or_session, "draft") else make_session(drafter_or_session, 1)
    return speculative_generate_batch(target, session, [prompt], max_new_tokens, sampling, eos_token_id, generator, scheduler)[0]


def autoregressive_generate(target: TargetModel, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                            eos_token_id: int | None = None, generator: torch.Generator | None = None) -> GenerationResult:
    """Plain decoding of one prompt (P,): the batch of one."""
    return autoregressive_generate_batch(target, [prompt], max_new_tokens, sampling, eos_token_id, generator)[0]
