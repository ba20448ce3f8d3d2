"""Loss terms against a direct (unchunked, loop-by-loop) reference computation on small tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepspec.config.train import LossConfig
from deepspec.losses import block_draft_loss, eagle3_loss
from test_drafters import MASK_ID, batch, make, parts  # noqa: F401  (fixture re-used)
from deepspec.drafters.blocks import make_blocks, sample_anchors


def reference_block_loss(model, h, blocks, target_final, cfg: LossConfig):
    """Slot by slot, straight from the definitions in dspark.md."""
    B, A, g, _ = h.shape
    num = {"ce": 0.0, "l1": 0.0, "bce": 0.0}
    den = 0.0
    for b in range(B):
        for a in range(A):
            prev = model.prev_tokens(blocks.input_ids[b, a], blocks.labels[b, a])[None]
            logits = model.logits(h[b, a][None], prev)[0].float()  # (g, V)
            conf = model.confidence_logits(h[b, a][None], prev)
            for k in range(g):
                if not blocks.label_valid[b, a, k]:
                    continue
                w = math.exp(-k / cfg.decay_gamma)
                p_d = torch.softmax(logits[k], -1)
                p_t = torch.softmax(model.lm_head(target_final[b, blocks.anchors[b, a] + k]).float(), -1)
                l1 = (p_d - p_t).abs().sum()
                num["ce"] += w * -torch.log_softmax(logits[k], -1)[blocks.labels[b, a, k]]
                num["l1"] += w * l1
                if conf is not None:
                    label = (1 - 0.5 * l1).clamp(0, 1).detach()
                    num["bce"] += w * F.binary_cross_entropy_with_logits(conf[0, k].float(), label)
                den += w
    terms = {k: v / den for k, v in num.items()}
    has_conf = getattr(model, "confidence_head", None) is not None
    loss = cfg.ce_weight * terms["ce"] + cfg.l1_weight * terms["l1"] + (cfg.confidence_weight * terms["bce"] if has_conf else 0)
    return loss, terms


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn", "dflash"])
@pytest.mark.parametrize("chunk,recompute", [(2, True), (1000, True), (2, False)])
def test_block_loss_matches_direct_computation_and_its_gradients(parts, kind, chunk, recompute):
    model = make(kind, parts)
    ids, loss_mask, valid, hidden = batch()
    target_final = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(5)) * 0.3
    anchors, keep = sample_anchors(loss_mask, model.cfg.num_anchors, [1, 2])
    blocks = make_blocks(ids, loss_mask, anchors, keep, model.cfg.block_size, MASK_ID)
    cfg = LossConfig(chunk_blocks=chunk, recompute_logits=recompute)  # kept logits: the same loss and gradients
    h = model(hidden, valid, blocks)
    out = block_draft_loss(model, h, blocks, target_final, cfg)
    grads = torch.autograd.grad(out["loss"], [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    h = model(hidden, valid, blocks)
    ref, terms = reference_block_loss(model, h, blocks, target_final, cfg)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert torch.allclose(out["loss"], ref, rtol=1e-5, atol=1e-6)
    for key in ("ce", "l1", "bce"):
        assert torch.allclose(out[key], torch.as_tensor(terms[key]), rtol=1e-5, atol=1e-6), key
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)


def test_block_metrics_are_analytic_acceptance(parts):
    model = make("vanilla", parts)
    ids, loss_mask, valid, hidden = batch()
    target_final = torch.randn(2, 30, 64) * 0.3
    anchors, keep = sample_anchors(loss_mask, 6, [1, 2])
    blocks = make_blocks(ids, loss_mask, anchors, keep, 4, MASK_ID)
    with torch.no_grad():
        out = block_draft_loss(model, model(hidden, valid, blocks), blocks, target_final, LossConfig())
    v = blocks.label_valid.flatten(0, 1)
    assert torch.equal(out["acc_count"], v.sum(0).float())
    rows = v.any(-1)
    assert out["tau_count"] == rows.sum()
    assert 1 <= out["tau_sum"] / out["tau_count"] <= 1 + 4


@pytest.mark.parametrize("normalization", ["local_mean", "valid_token_mean"])
def test_eagle3_loss_matches_direct_computation(parts, normalization):
    """DeepSpec's rule, position by position: step k at t is supervised when loss_mask[t+k] is set and t+k+1 is a
    real position; its soft label is the target at t+1+k; each step's sum is divided by B x S (local_mean) or by its
    supervised count (valid_token_mean)."""
    model = make("eagle3", parts)
    ids, loss_mask, valid, hidden = batch()
    target_final = torch.randn(2, 30, 64) * 0.3
    h = model(hidden, ids, valid)
    cfg = LossConfig(chunk_positions=7)
    out = eagle3_loss(model, h, loss_mask * valid, valid, target_final, cfg, step_decay=0.8, normalization=normalization)
    total = 0.0
    B, K, S, _ = h.shape
    for k in range(K):
        ces = []
        for b in range(B):
            for t in range(S):
                if t + k + 1 < S and loss_mask[b, t + k] and valid[b, t + k] and valid[b, t + k + 1]:
                    p_t = torch.softmax(model.lm_head(target_final[b, t + 1 + k]).float(), -1)
                    ces.append(-(p_t * torch.log_softmax(model.lm_head(h[b, k, t]).float(), -1)).sum())
        total = total + 0.8**k * torch.stack(ces).sum() / (B * S if normalization == "local_mean" else len(ces))
    assert torch.allclose(out["loss"], total, rtol=1e-5)
