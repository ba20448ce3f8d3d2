"""Incremental drafter state: a session that appended the context chunk by chunk over random
accept/reject histories (batched, ragged, with plain rounds that skip drafting) proposes what a
full recomputation proposes: the drafter's own training forward over the whole context (block
drafters, Eagle3's training-time-test unroll) and a fresh session fed the history in one chunk.

Exactness: tokens equal; probabilities/confidences equal to 1e-5 in fp32. Bitwise equality is not
what CPU BLAS gives: a GEMM over 3 rows and the same 3 rows inside a GEMM over 300 differ in the
last bit (the kernel blocks by row count), so full recomputation itself is not bitwise stable.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepspec.decoding.sessions import make_session
from deepspec.decoding.verify import SamplingConfig
from deepspec.drafters.blocks import Blocks
from test_drafters import MASK_ID, make, parts  # noqa: F401 (fixture)

KINDS = ["vanilla", "gated", "rnn", "dflash", "eagle3"]
F = 3 * 64  # three target layers of width 64
ATOL = 1e-5


@pytest.fixture(scope="module")
def drafters(parts):  # noqa: F811
    out = {}
    for kind in KINDS:
        d = make(kind, parts).eval()
        g = torch.Generator().manual_seed(1)
        for p in d.parameters():  # peaked, non-uniform draft distributions
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        out[kind] = d
    return out


def full_recompute_logits(drafter, kind: str, feats: torch.Tensor, toks: torch.Tensor, anchor: int, drafts: torch.Tensor) -> torch.Tensor:
    """The drafter's training forward over the whole context -> logits (g, V) of each drafted slot,
    teacher-forced with the session's own drafts (so each slot sees the same previous token)."""
    n, g = feats.shape[0], drafts.shape[0]
    with torch.no_grad():
        if kind == "eagle3":  # step k at the last position consumed token n+k: the anchor, then d_1..d_{g-1}
            ids = torch.cat([toks, torch.tensor([anchor]), drafts[:-1]])[None]
            hidden = torch.cat([feats, feats.new_zeros(g, F)])[None]
            valid = torch.arange(n + g)[None] < n
            h = drafter(hidden, ids, valid)[0, :, n - 1]  # (g, d)
            return drafter.lm_head(h)
        ids = torch.full((1, 1, g), MASK_ID)
        ids[..., 0] = anchor
        blocks = Blocks(anchors=torch.tensor([[n]]), keep=torch.ones(1, 1, dtype=torch.bool), input_ids=ids, labels=ids,
                        label_valid=ids.bool(), positions=n + torch.arange(g).view(1, 1, g))
        h = drafter(feats[None], torch.ones(1, n, dtype=torch.bool), blocks)[0]  # (1, g, d)
        prev = torch.cat([torch.tensor([anchor]), drafts[:-1]])[None]
        return drafter.logits(h, prev)[0]


@st.composite
def histories(draw):
    B = draw(st.integers(1, 3))
    first = draw(st.lists(st.integers(1, 9), min_size=B, max_size=B))
    rounds = draw(st.lists(st.tuples(st.booleans(), st.lists(st.integers(1, 5), min_size=B, max_size=B)), min_size=1, max_size=4))
    return B, first, rounds


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories(), seed=st.integers(0, 2**16))
def test_incremental_session_equals_full_recomputation(drafters, kind, history, seed):
    drafter, greedy = drafters[kind], SamplingConfig(temperature=0)
    B, first, rounds = history
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, F, generator=g) for n in first]
    toks = [torch.randint(5, 4000, (n,), generator=g) for n in first]
    session = make_session(drafter, B)
    T = max(first)  # the prompt arrives left-padded, like the engine's prefill
    pad_f, pad_t = torch.zeros(B, T, F), torch.zeros(B, T, dtype=torch.long)
    valid = torch.arange(T)[None] >= T - torch.tensor(first)[:, None]
    for b in range(B):
        pad_f[b, T - first[b]:], pad_t[b, T - first[b]:] = feats[b], toks[b]
    session.extend(pad_f, pad_t, valid)
    rows = torch.arange(B)
    for drafts_now, accepted in rounds:
        anchors = torch.randint(5, 4000, (B,), generator=g)
        if drafts_now:  # a plain round skips drafting: the session must catch up lazily
            got = session.draft(rows, anchors, greedy, None)
            for b in range(B):
                ref = full_recompute_logits(drafter, kind, feats[b], toks[b], int(anchors[b]), got.tokens[b])
                assert torch.equal(ref.argmax(-1), got.tokens[b]), (kind, b)
                one = make_session(drafter, 1)  # the same history in one chunk, through the session code
                one.extend(feats[b][None], toks[b][None], torch.ones(1, len(toks[b]), dtype=torch.bool))
                alone = one.draft(torch.tensor([0]), anchors[b : b + 1], greedy, None)
                assert torch.equal(alone.tokens[0], got.tokens[b])
                assert torch.allclose(alone.confidence[0], got.confidence[b], atol=ATOL)
        # the round verified [anchor, accepted drafts]: append new features and tokens (ragged per row)
        new = [torch.randn(k, F, generator=g) for k in accepted]
        new_t = [torch.cat([anchors[b : b + 1], torch.randint(5, 4000, (k - 1,), generator=g)]) for b, k in enumerate(accepted)]
        W = max(accepted)
        chunk_f, chunk_t = torch.zeros(B, W, F), torch.zeros(B, W, dtype=torch.long)
        for b, k in enumerate(accepted):
            chunk_f[b, :k], chunk_t[b, :k] = new[b], new_t[b]
            feats[b], toks[b] = torch.cat([feats[b], new[b]]), torch.cat([toks[b], new_t[b]])
        session.extend(chunk_f, chunk_t, torch.arange(W)[None] < torch.tensor(accepted)[:, None])


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_draft_probabilities_equal_full_recomputation(drafters, kind):
    """T=1: q of every slot is the full recomputation's distribution given the drafted prefix."""
    drafter, sampling = drafters[kind], SamplingConfig(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    n = 11
    feats, toks = torch.randn(n, F, generator=g), torch.randint(5, 4000, (n,), generator=g)
    session = make_session(drafter, 1)
    session.extend(feats[None, :4], toks[None, :4], torch.ones(1, 4, dtype=torch.bool))
    session.draft(torch.tensor([0]), toks[4:5], sampling, g)  # a draft in between: its block must leave no trace
    session.extend(feats[None, 4:], toks[None, 4:], torch.ones(1, n - 4, dtype=torch.bool))
    got = session.draft(torch.tensor([0]), torch.tensor([7]), sampling, g)
    ref = torch.softmax(full_recompute_logits(drafter, kind, feats, toks, 7, got.tokens[0]).float(), -1)
    assert torch.allclose(got.q[0], ref, atol=ATOL)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_queue_hands_each_rows_entries_in_order_and_never_writes_what_it_was_handed(data):
    """``PendingFeatures``: chunks of (B, T) entries with ragged valid masks, taken by random subsets of rows, give each
    row its valid entries in order, once; the valid masks it was handed stay as they were (the loop queues views of
    its own live tensors: a plain round's valid mask is the loop's ``active``); ``queued`` counts what is left per row
    whenever asked (the gate prices a probe's catch-up by it)."""
    from deepspec.decoding.sessions.state import PendingFeatures

    B = data.draw(st.integers(1, 4))
    queue, handed, expected, got = PendingFeatures(), [], [[] for _ in range(B)], [[] for _ in range(B)]
    counter = 0
    for _ in range(data.draw(st.integers(1, 6))):
        T = data.draw(st.integers(1, 3))
        tokens = torch.arange(counter, counter + B * T).view(B, T)
        counter += B * T
        valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B)))
        queue.add(tokens.float()[..., None], tokens, valid)
        handed.append((valid, valid.clone()))
        for r in range(B):
            expected[r] += tokens[r][valid[r]].tolist()
        if data.draw(st.booleans()):
            assert queue.queued(torch.arange(B)).tolist() == [len(e) - len(g) for e, g in zip(expected, got)]
        if data.draw(st.booleans()):
            rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, B - 1), min_size=1))))
            feats, toks, counts = queue.take(rows)
            for i, r in enumerate(rows.tolist()):
                got[r] += toks[i, : counts[i]].tolist()
                assert feats[i, : counts[i], 0].long().tolist() == toks[i, : counts[i]].tolist()
    assert queue.queued(torch.arange(B)).tolist() == [len(e) - len(g) for e, g in zip(expected, got)]
    feats, toks, counts = queue.take(torch.arange(B))
    for r in range(B):
        got[r] += toks[r, : counts[r]].tolist()
    assert got == expected
    for valid, before in handed:
        assert torch.equal(valid, before), "the queue wrote into a valid mask it was handed"
