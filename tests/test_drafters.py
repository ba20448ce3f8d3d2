"""Drafter models on a tiny real target: forward/backward, attention semantics, SDPA = flex."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from deepspec.config.data import TargetConfig
from deepspec.drafters import DFlashConfig, DFlashDrafter, DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from deepspec.drafters.blocks import anchor_candidates, make_blocks, sample_anchors
from deepspec.target import load_frozen_embeddings

LAYERS = [-1, 1, 3]
MASK_ID = 3


@pytest.fixture(scope="module")
def parts(tiny_target):
    tc = AutoConfig.from_pretrained(tiny_target)
    embed, head = load_frozen_embeddings(TargetConfig(name_or_path=str(tiny_target)))
    return tc, embed, head


def make(kind: str, parts, backend: str = "sdpa", **kw):
    tc, embed, head = parts
    torch.manual_seed(0)
    if kind == "dflash":
        return DFlashDrafter(DFlashConfig(block_size=4, num_hidden_layers=2, num_anchors=6, mask_token_id=MASK_ID,
                                          target_layer_ids=LAYERS, attention_backend=backend), tc, embed, head)
    if kind == "eagle3":
        return Eagle3Drafter(Eagle3Config(ttt_steps=3, target_layer_ids=LAYERS, attention_backend=backend), tc, embed, head)
    return DSparkDrafter(DSparkConfig(block_size=4, num_hidden_layers=2, markov_rank=8, markov_head_type=kind, num_anchors=6,
                                      mask_token_id=MASK_ID, target_layer_ids=LAYERS, attention_backend=backend, **kw), tc, embed, head)


def batch(seed: int = 0, B: int = 2, S: int = 30):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 4000, (B, S), generator=g)
    loss_mask = torch.zeros(B, S, dtype=torch.uint8)
    loss_mask[:, 8:] = 1
    valid = torch.ones(B, S, dtype=torch.bool)
    if B > 1:
        loss_mask[1, 25:] = 0
        valid[1, 27:] = False
    hidden = torch.randn(B, S, 3 * 64, generator=g)
    return ids, loss_mask, valid, hidden


def run_block(model, ids, loss_mask, valid, hidden, seeds=(1, 2)):
    anchors, keep = sample_anchors(loss_mask, model.cfg.num_anchors, list(seeds))
    blocks = make_blocks(ids, loss_mask, anchors, keep, model.cfg.block_size, MASK_ID)
    return model(hidden, valid, blocks), blocks


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn", "dflash", "eagle3"])
def test_forward_backward_trains_only_the_drafter(parts, kind):
    model = make(kind, parts)
    ids, loss_mask, valid, hidden = batch()
    if kind == "eagle3":
        h = model(hidden, ids, valid)
        assert h.shape == (2, 3, 30, 64)
        logits = model.lm_head(h)
        conf = None
    else:
        h, blocks = run_block(model, ids, loss_mask, valid, hidden)
        assert h.shape == (2, blocks.anchors.shape[1], 4, 64)
        prev = model.prev_tokens(blocks.input_ids, blocks.labels)
        logits = model.logits(h.flatten(0, 1), prev.flatten(0, 1))
        conf = model.confidence_logits(h.flatten(0, 1), prev.flatten(0, 1))
        assert (conf is None) == (kind == "dflash")
    loss = logits.logsumexp(-1).mean() + (conf.mean() if conf is not None else 0)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "embed_tokens.weight" not in trainable and "lm_head.weight" not in trainable
    assert model.embed_tokens.weight.grad is None
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    expected_unused = {"markov_head.markov_w2.weight"} if kind == "dflash" else set()
    assert set(no_grad) <= expected_unused, no_grad


def test_anchor_rule_and_cumulative_validity():
    ids = torch.arange(20)[None] + 100
    loss_mask = torch.tensor([[0] * 5 + [1] * 6 + [0] * 2 + [1] * 7], dtype=torch.uint8)
    cand = anchor_candidates(loss_mask)[0]
    assert cand.nonzero().flatten().tolist() == [5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18]
    anchors, keep = sample_anchors(loss_mask, 50, [0])
    assert keep.all() and anchors[0].tolist() == cand.nonzero().flatten().tolist()  # all taken, sorted
    anchors, keep = sample_anchors(loss_mask, 4, [0])
    assert anchors.shape == (1, 4) and torch.all(anchors[0, 1:] > anchors[0, :-1]) and cand[anchors[0]].all()
    blocks = make_blocks(ids, loss_mask, torch.tensor([[9, 17]]), torch.tensor([[True, True]]), 4, MASK_ID)
    # anchor 9: labels 10 (masked), 11 (unmasked: stop) -> only slot 0; anchor 17: labels 18, 19, then the end
    assert blocks.label_valid[0].tolist() == [[True, False, False, False], [True, True, False, False]]
    assert blocks.labels[0, 0, 0] == 110 and blocks.input_ids[0, 1].tolist() == [117, MASK_ID, MASK_ID, MASK_ID]


def test_block_sees_only_context_before_its_anchor_and_its_own_block(parts):
    model = make("vanilla", parts).eval()
    ids, loss_mask, valid, hidden = batch(B=1)
    anchors, keep = torch.tensor([[12, 20]]), torch.tensor([[True, True]])
    blocks = make_blocks(ids, loss_mask, anchors, keep, 4, MASK_ID)
    with torch.no_grad():
        base = model(hidden, valid, blocks)
        later = hidden.clone()
        later[:, 12:] += 5.0  # positions >= the first anchor: invisible to block 0, visible to block 1
        moved = model(later, valid, blocks)
        assert torch.allclose(base[0, 0], moved[0, 0], atol=1e-6)
        assert not torch.allclose(base[0, 1], moved[0, 1], atol=1e-3)
        ids2 = ids.clone()
        ids2[0, 20] = 7  # block 1's anchor token: must not leak into block 0
        moved = model(hidden, valid, make_blocks(ids2, loss_mask, anchors, keep, 4, MASK_ID))
        assert torch.allclose(base[0, 0], moved[0, 0], atol=1e-6)
        assert not torch.allclose(base[0, 1], moved[0, 1], atol=1e-3)


def test_eagle3_step_k_sees_prefix_and_its_own_position_only(parts):
    model = make("eagle3", parts).eval()
    ids, loss_mask, valid, hidden = batch(B=1)
    with torch.no_grad():
        base = model(hidden, ids, valid)
        later = hidden.clone()
        later[:, 16:] += 5.0
        moved = model(hidden=later, input_ids=ids, valid=valid)
    # position t at every step reads features <= t only
    assert torch.allclose(base[:, :, :16], moved[:, :, :16], atol=1e-5)
    assert not torch.allclose(base[:, :, 16:], moved[:, :, 16:], atol=1e-3)


@pytest.mark.parametrize("kind", ["vanilla", "eagle3"])
def test_sdpa_and_flex_attention_agree(parts, kind):
    sdpa, flex = make(kind, parts, "sdpa").eval(), make(kind, parts, "flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    ids, loss_mask, valid, hidden = batch()
    with torch.no_grad():
        if kind == "eagle3":
            a, b = sdpa(hidden, ids, valid), flex(hidden, ids, valid)
        else:
            a, _ = run_block(sdpa, ids, loss_mask, valid, hidden)
            b, _ = run_block(flex, ids, loss_mask, valid, hidden)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_rope_frequencies_stay_fp32_when_the_drafter_is_cast_to_bf16(parts):
    model = make("vanilla", parts)
    x = torch.zeros(1, 1, 8)
    pos = torch.tensor([[4000]])
    ref_cos, _ = model.rotary(x, pos)
    model = model.to(torch.bfloat16)
    cos, _ = model.rotary(x, pos)  # computed in fp32 from fp32 frequencies, then cast
    assert torch.allclose(cos.float(), ref_cos.float(), atol=1e-6)
    assert model.rotary.inv_freq_fp32.dtype == torch.float32


def test_markov_heads_follow_their_recurrences(parts):
    """The gated and RNN heads against their formulas in dspark.md, written out with raw tensors."""
    from deepspec.drafters.heads import MarkovHead

    torch.manual_seed(0)
    d, r, V, g = 64, 8, 4096, 4
    prev, h = torch.randint(0, V, (2, g)), torch.randn(2, g, d)
    gated = MarkovHead(V, d, r, "gated")
    e = gated.markov_w1.weight[prev]  # (2, g, r)
    gate = torch.sigmoid(torch.cat([h, e], -1) @ gated.gate_proj.weight.T + gated.gate_proj.bias)
    assert torch.allclose(gated(prev, h), gate * e, atol=1e-6)
    rnn = MarkovHead(V, d, r, "rnn")
    e, s, zs = rnn.markov_w1.weight[prev], torch.zeros(2, r), []
    for k in range(g):
        gk, ck, ok = (torch.cat([s, e[:, k], h[:, k]], -1) @ rnn.joint_proj.weight.T + rnn.joint_proj.bias).chunk(3, -1)
        s = torch.sigmoid(gk) * s + (1 - torch.sigmoid(gk)) * torch.tanh(ck)
        zs.append(torch.tanh(ok))
    assert torch.allclose(rnn(prev, h), torch.stack(zs, 1), atol=1e-6)


@pytest.mark.parametrize("step", [0, 1, 3])
def test_ttt_attend_equals_sdpa_over_the_full_ttt_mask_with_gradients(step):
    """Eagle3's decomposed TTT attention (step-0 keys + each later step's own position) against SDPA over
    every concatenated key with the full mask: outputs and gradients, grouped-query heads, a padded row."""
    import torch.nn.functional as F

    from deepspec.drafters.eagle3 import ttt_attend, ttt_mask

    g = torch.Generator().manual_seed(step)
    B, H, Hkv, T, hd = 2, 4, 2, 9, 8
    q = torch.randn(B, H, T, hd, generator=g, requires_grad=True)
    kv = [(torch.randn(B, Hkv, T, hd, generator=g, requires_grad=True), torch.randn(B, Hkv, T, hd, generator=g, requires_grad=True))
          for _ in range(step + 1)]
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 6:] = False
    out = ttt_attend(q, kv, ttt_mask(T, 0, valid))
    K, V = torch.cat([k for k, _ in kv], 2), torch.cat([v for _, v in kv], 2)
    ref = F.scaled_dot_product_attention(q, K, V, attn_mask=ttt_mask(T, step, valid), enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    leaves = [q] + [t for pair in kv for t in pair]
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
