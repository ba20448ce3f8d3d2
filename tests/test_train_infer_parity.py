"""Training sees what inference sees, and the training-time expected tau is its definition.

1. The Markov head's previous token. In training (teacher forcing) slot k of a block is fed x_{k-1} with x_0 the
   anchor and x_k the k-th label; at inference the walk feeds it the anchor, then its own drafts. A block whose
   labels are the drafts the session just walked must therefore give the same logits, the same q and the same
   confidences in the training pass, and the loss's CE must be the weighted -log q_k(d_k) of the session's q.
   The previous tokens are also written out by hand ([anchor, d_1, ..., d_{g-1}]): feeding slot k its own label
   (a leak that makes training look perfect) or dropping the anchor fails here.
2. Expected tau (it picks the best/ checkpoint): per block with a supervised slot, 1 + sum_k prod_{i<=k} a_i over
   the supervised slots (the 1 is the bonus token), a_i = 1 - TV(p_d, p_t) = sum_v min(p_d, p_t); averaged over
   blocks across micro-batches (sum of taus / number of blocks). Checked on two-token laws whose acceptance is
   worked out by hand.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from deepspec.config.train import LossConfig
from deepspec.decoding.sessions import make_session
from deepspec.decoding.verify import SamplingConfig
from deepspec.drafters.blocks import Blocks, make_blocks
from deepspec.losses import block_draft_loss
from deepspec.training.metrics_log import MetricSums
from test_drafters import MASK_ID, make, parts  # noqa: F401 (fixture)

F = 3 * 64  # three target layers of width 64
CASES = [("vanilla", SamplingConfig(0.0)), ("vanilla", SamplingConfig(1.0)), ("vanilla", SamplingConfig(0.8, top_k=50)),
         ("gated", SamplingConfig(1.0)), ("rnn", SamplingConfig(1.0)), ("rnn", SamplingConfig(0.0))]


@pytest.fixture(scope="module")
def drafters(parts):  # noqa: F811
    out = {}
    for kind in ("vanilla", "gated", "rnn"):
        d = make(kind, parts).eval()
        g = torch.Generator().manual_seed(1)
        for p in d.parameters():  # peaked, non-uniform draft distributions: the Markov bias moves the argmax
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        out[kind] = d
    return out


@pytest.mark.parametrize("kind,sampling", CASES, ids=[f"{k}-T{s.temperature}-k{s.top_k}" for k, s in CASES])
def test_the_training_pass_feeds_the_head_what_the_inference_walk_fed_it(drafters, kind, sampling):
    d, n, anchor = drafters[kind], 9, 17
    gen = torch.Generator().manual_seed(3)
    feats, toks = torch.randn(n, F, generator=gen), torch.randint(5, 4000, (n,), generator=gen)
    session = make_session(d, 1)
    session.extend(feats[None], toks[None], torch.ones(1, n, dtype=torch.bool))
    draft = session.draft(torch.tensor([0]), torch.tensor([anchor]), sampling, gen)
    drafts, g = draft.tokens[0], draft.tokens.shape[1]

    # the training sample: the context, the anchor at position n, then the walked drafts (the block's labels)
    ids = torch.cat([toks, torch.tensor([anchor]), drafts])[None]
    S = ids.shape[1]
    hidden = torch.cat([feats, torch.randn(S - n, F, generator=gen)])[None]  # features from the anchor on are never seen
    blocks = make_blocks(ids, torch.ones(1, S, dtype=torch.uint8), torch.tensor([[n]]), torch.ones(1, 1, dtype=torch.bool), g, MASK_ID)
    assert blocks.labels[0, 0].tolist() == drafts.tolist() and bool(blocks.label_valid.all())
    prev = d.prev_tokens(blocks.input_ids, blocks.labels)[0]  # (1, g)
    assert prev[0].tolist() == [anchor] + drafts[:-1].tolist()  # x_0 = the anchor, x_k = d_k: written out

    with torch.no_grad():
        h = d(hidden, torch.ones(1, S, dtype=torch.bool), blocks)[0]  # (1, g, dim)
        logits = d.logits(h, prev).float()[0]  # (g, V)
        conf = torch.sigmoid(d.confidence_logits(h, prev).float())[0]
        assert torch.allclose(conf, draft.confidence[0], atol=1e-5)
        if sampling.greedy:
            assert logits.argmax(-1).tolist() == drafts.tolist()
            return
        assert torch.allclose(sampling.probs(logits), draft.q[0], atol=1e-5)
        if sampling.temperature != 1.0 or sampling.top_k:
            return
        # the loss path: CE = sum_k w_k (-log q_k(d_k)) / sum_k w_k, w_k = exp(-k / 4), with the session's own q
        out = block_draft_loss(d, h[None], blocks, torch.randn(1, S, h.shape[-1], generator=gen), LossConfig(decay_gamma=4.0))
        w = [math.exp(-k / 4) for k in range(g)]
        ce = sum(wk * -math.log(float(draft.q[0, k, drafts[k]])) for k, wk in enumerate(w)) / sum(w)
        assert float(out["ce"]) == pytest.approx(ce, rel=1e-4)


class TwoTokenDrafter:
    """A stand-in block drafter over a 2-token vocabulary: its draft logits are h itself and the target's LM head
    is the identity, so each slot's p_d and p_t are set by hand (no Markov or confidence head)."""

    d2t, confidence_head, target_config = None, None, SimpleNamespace()

    @staticmethod
    def target_head(x):
        return x

    @staticmethod
    def prev_tokens(block_input_ids, labels):
        return labels

    @staticmethod
    def logits(h, prev):
        return h

    @staticmethod
    def target_to_draft(labels):
        return labels

    @staticmethod
    def confidence_logits(h, prev):
        return None


def two_token_logits(p_first: list[float]) -> torch.Tensor:
    """P(token 0) per slot -> logits (len, 2) of the laws (p, 1 - p)."""
    p = torch.tensor(p_first, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], -1).float()


def hand_blocks(p_draft: list[list[float]], p_target: list[list[float]], valid: list[list[int]]):
    """Blocks of 3 slots anchored at 0, 4, 8, ... of one sample: -> h (1, A, 3, 2), Blocks, target_final (1, S, 2)."""
    A, g = len(p_draft), 3
    anchors = torch.arange(A)[None] * 4
    positions = anchors[..., None] + torch.arange(g)
    S = 4 * A
    h = torch.stack([two_token_logits(p) for p in p_draft])[None]
    target = torch.zeros(1, S, 2)
    for a in range(A):
        target[0, 4 * a : 4 * a + g] = two_token_logits(p_target[a])  # slot k's target law sits at anchor + k
    label_valid = torch.tensor(valid, dtype=torch.bool)[None]
    zeros = torch.zeros(1, A, g, dtype=torch.long)
    return h, Blocks(anchors, torch.ones(1, A, dtype=torch.bool), zeros, zeros, label_valid, positions), target


def test_expected_tau_is_one_plus_the_summed_cumulative_acceptance():
    """a = 1 - |x - y| for laws (x, 1 - x), (y, 1 - y).
    Block 0: a = (0.75, 0.7, 1.0), all supervised: tau = 1 + 0.75 + 0.75*0.7 + 0.75*0.7*1.0 = 2.8.
    Block 1: a = (0.8, 1.0, 0.2), the last slot unsupervised (past the sequence's end): tau = 1 + 0.8 + 0.8 = 2.6.
    Block 2: nothing supervised: not a block of the mean."""
    h, blocks, target = hand_blocks([[0.5, 0.9, 0.3], [0.8, 0.5, 0.1], [0.5, 0.5, 0.5]],
                                    [[0.25, 0.6, 0.3], [0.6, 0.5, 0.9], [0.1, 0.1, 0.1]],
                                    [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    with torch.no_grad():
        out = block_draft_loss(TwoTokenDrafter(), h, blocks, target, LossConfig())
    assert float(out["tau_count"]) == 2
    assert float(out["tau_sum"]) == pytest.approx(2.8 + 2.6, abs=1e-5)
    assert out["acc_sum"].tolist() == pytest.approx([0.75 + 0.8, 0.7 + 1.0, 1.0], abs=1e-5)
    assert out["acc_count"].tolist() == [2, 2, 1]


def test_expected_tau_averages_blocks_over_micro_batches():
    """Micro-batch 1: the blocks above (taus 2.8, 2.6); micro-batch 2: one block a = (0.5, ...) with only slot 0
    supervised (tau 1.5). expected_tau = (2.8 + 2.6 + 1.5) / 3 = 2.3 (a mean of the micro-batches' means would be
    2.1); accept_rate@0 = (0.75 + 0.8 + 0.5) / 3."""
    sums = MetricSums()
    with torch.no_grad():
        h, blocks, target = hand_blocks([[0.5, 0.9, 0.3], [0.8, 0.5, 0.1]], [[0.25, 0.6, 0.3], [0.6, 0.5, 0.9]],
                                        [[1, 1, 1], [1, 1, 0]])
        sums.add(block_draft_loss(TwoTokenDrafter(), h, blocks, target, LossConfig()))
        h, blocks, target = hand_blocks([[0.5, 0.5, 0.5]], [[1.0 - 1e-9, 0.5, 0.5]], [[1, 0, 0]])
        sums.add(block_draft_loss(TwoTokenDrafter(), h, blocks, target, LossConfig()))
    got = sums.reduce()
    assert got["expected_tau"] == pytest.approx(2.3, abs=1e-5)
    assert got["accept_rate@0"] == pytest.approx((0.75 + 0.8 + 0.5) / 3, abs=1e-5)
    assert got["accept_rate@2"] == pytest.approx(1.0, abs=1e-5)
