"""Training losses, computed in vocabulary-sized chunks.

Block drafters (DSpark, DFlash), per supervised block slot k (weights w_k = exp(-k / decay_gamma)):

    CE   = -log p_d(label_k)                        (Markov-corrected draft logits)
    L1   = sum_v |p_d(v) - p_t(v)|                  (fp32 softmax at T=1; 1 - L1/2 = acceptance)
    BCE  = BCE(conf_k, stop_grad(1 - L1/2))         (confidence head)
    loss = (a_ce CE + a_l1 L1 + a_conf BCE) summed with weights w_k, divided by sum w_k

p_t at slot k comes from the target's final hidden state at position anchor+k through the frozen
LM head.

Reduced draft vocabulary (N of V tokens, ``drafters/draft_vocab.py``): the drafter's q is a law over
the full vocabulary that is zero outside the draft ids, so with p_t split into its draft-vocabulary
part and the mass m_out it puts elsewhere,

    L1   = sum_{v in draft} |p_d(v) - p_t(v)| + m_out      (still exactly 2 x total variation: 1 - L1/2 = acceptance)
    CE   = as above on labels inside the draft vocabulary; labels outside are masked (q gives them 0) and
           counted (``label_outside_draft_vocab``)
    Eagle3's soft CE: against p_t restricted to the draft vocabulary and renormalised.

Weights and chunk sizes: ``deepspec.config.train.LossConfig``. Memory: the (blocks, g, V) logits exist for
``chunk_blocks`` blocks at a time and are recomputed in backward (activation checkpointing per chunk), so peak memory does not grow with
num_anchors x block_size x vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from deepspec.config.train import LossConfig
from deepspec.target import apply_softcap, final_logit_softcap


def target_logits(drafter, target_h: torch.Tensor) -> torch.Tensor:
    """The target's own logits (fp32) from its cached final hidden states, through the drafter's frozen copy
    of its LM head and the target's final-logit soft-capping (Gemma-2/3), exactly as the target computes them."""
    return apply_softcap(drafter.target_head(target_h).float(), final_logit_softcap(drafter.target_config))


def split_target_probs(drafter, p_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
    """p_t (..., V) -> (p_t on the draft vocabulary (..., N), the target's mass outside it (...)).
    Full vocabulary: (p_t, 0.0), so the losses below are unchanged to the bit."""
    if drafter.d2t is None:
        return p_t, 0.0
    return p_t.index_select(-1, drafter.draft_ids), p_t.masked_fill(drafter.t2d, 0.0).sum(-1)  # summed directly: no 1 - sum cancellation


def _chunk_terms(drafter, h, prev, labels, target_h):
    """One chunk: h (n, g, d), prev/labels (n, g) target ids, target_h (n, g, d) -> per-slot ce, l1, bce, conf_prob,
    label_in_vocab (n, g)."""
    logp_d = torch.log_softmax(drafter.logits(h, prev).float(), dim=-1)  # (n, g, N)
    p_in, p_out = split_target_probs(drafter, torch.softmax(target_logits(drafter, target_h), dim=-1))  # (n, g, N), (n, g)
    draft_labels = drafter.target_to_draft(labels)  # -1 outside the draft vocabulary
    in_vocab = (draft_labels >= 0).float()
    ce = -logp_d.gather(-1, draft_labels.clamp_min(0)[..., None]).squeeze(-1) * in_vocab
    l1 = (logp_d.exp() - p_in).abs().sum(-1) + p_out
    acc = (1 - 0.5 * l1).clamp(0, 1).detach()
    conf = drafter.confidence_logits(h, prev)
    if conf is None:
        return ce, l1, torch.zeros_like(ce), torch.full_like(ce, float("nan")), in_vocab
    bce = F.binary_cross_entropy_with_logits(conf.float(), acc, reduction="none")
    return ce, l1, bce, torch.sigmoid(conf.float()).detach(), in_vocab


def block_draft_loss(drafter, h: torch.Tensor, blocks, target_final: torch.Tensor, cfg: LossConfig) -> dict:
    """Loss and metrics of a block drafter.

    Args:
        h: (B, A, g, d) backbone output; blocks: ``drafters.blocks.Blocks``;
        target_final: (B, S, d) target final-norm hidden states.
    Returns: {"loss": scalar, "ce", "l1", "bce": weighted means (detached), "acc_sum"/"acc_count": (g,)
        per-slot sums of analytic acceptance over supervised slots, "tau_sum"/"tau_count": expected tau
        summed over blocks with a supervised slot, "conf_bias_sum"/"conf_abs_sum"}.
    """
    B, A, g, d = h.shape
    S = target_final.shape[1]
    valid = blocks.label_valid  # (B, A, g)
    sel = valid.any(-1).flatten()  # blocks with at least one supervised slot
    h_blocks = h.flatten(0, 1)[sel]  # (n, g, d)
    prev = drafter.prev_tokens(blocks.input_ids, blocks.labels).flatten(0, 1)[sel]
    labels = blocks.labels.flatten(0, 1)[sel]
    pos = blocks.positions.clamp(max=S - 1)  # slot k's target distribution: hidden at anchor + k
    tgt = torch.gather(target_final, 1, pos.flatten(1)[..., None].expand(-1, -1, d)).view(B, A, g, d).flatten(0, 1)[sel]
    v = valid.flatten(0, 1)[sel].float()  # (n, g)
    w = v * torch.exp(-torch.arange(g, device=h.device, dtype=torch.float32) / cfg.decay_gamma)

    parts, recompute = [], cfg.recompute_logits and torch.is_grad_enabled()
    for i in range(0, h_blocks.shape[0], cfg.chunk_blocks):
        args = (h_blocks[i : i + cfg.chunk_blocks], prev[i : i + cfg.chunk_blocks], labels[i : i + cfg.chunk_blocks],
                tgt[i : i + cfg.chunk_blocks])
        parts.append(checkpoint(_chunk_terms, drafter, *args, use_reentrant=False) if recompute else _chunk_terms(drafter, *args))
    ce, l1, bce, conf, in_vocab = (torch.cat(t, 0) for t in zip(*parts)) if parts else (torch.zeros_like(w),) * 5
    wsum = w.sum().clamp_min(1e-6)
    l1_m, bce_m = ((t * w).sum() / wsum for t in (l1, bce))
    ce_m = (ce * w).sum() / (w * in_vocab).sum().clamp_min(1e-6)  # labels outside the draft vocabulary are not trained
    has_conf = getattr(drafter, "confidence_head", None) is not None
    loss = cfg.ce_weight * ce_m + cfg.l1_weight * l1_m + (cfg.confidence_weight * bce_m if has_conf else 0.0)
    if not parts:  # no supervised slot in this micro-batch: a zero loss that still reaches every parameter
        loss = h.sum() * 0.0

    acc = (1 - 0.5 * l1.detach()).clamp(0, 1)  # analytic acceptance of each slot, given the previous accepted
    survive = torch.cumprod(acc * v, dim=-1)  # P(slots 0..k all accepted)
    metrics = {
        "ce": ce_m.detach(), "l1": l1_m.detach(), "bce": bce_m.detach(),
        "acc_sum": (acc * v).sum(0), "acc_count": v.sum(0),
        "tau_sum": (1 + survive.sum(-1)).sum(), "tau_count": torch.tensor(float(v.shape[0]), device=h.device),
    }
    if drafter.d2t is not None:  # fraction of supervised labels the draft vocabulary cannot propose
        metrics["label_outside_draft_vocab"] = ((1 - in_vocab) * v).sum() / v.sum().clamp_min(1)
    if has_conf:  # always present with the head, so every rank all-reduces the same keys
        metrics["conf_bias_sum"] = torch.nan_to_num((conf - acc) * v).sum()
        metrics["conf_abs_sum"] = torch.nan_to_num((conf - acc).abs() * v).sum()
    return {"loss": loss, **metrics}


def _soft_ce_terms(drafter, h, target_h):
    """h, target_h (n, d) -> soft CE -sum p_t log p_d, and L1 sum |p_d - p_t| (n,).

    Reduced vocabulary: the soft label is p_t restricted to the draft vocabulary and renormalised (the drafter
    cannot put mass elsewhere; a target law entirely outside it gives a zero label); L1 adds the mass outside."""
    logp_d = torch.log_softmax(drafter.lm_head(h).float(), dim=-1)  # (n, N)
    p_in, p_out = split_target_probs(drafter, torch.softmax(target_logits(drafter, target_h), dim=-1))
    soft = p_in if drafter.d2t is None else p_in / p_in.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(soft * logp_d).sum(-1), (logp_d.exp() - p_in).abs().sum(-1) + p_out


def eagle3_supervised(loss_mask: torch.Tensor, valid: torch.Tensor, step: int, teacher_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) bool: TTT step ``step`` at position t is supervised when loss_mask[t + step] is set and position
    t + step + 1 is real (DeepSpec's rule: the loss mask with each row's last real token cleared, shifted left by the
    step; the soft label is the target's law at t + step + 1). loss_mask (B, S), zero on padding; valid (B, S).

    ``teacher_valid`` (B, S): where the target's final state exists. The cache keeps it only at p with
    loss_mask[p + 1] (``data/cache/records.py``), so the two teacher positions after each assistant span's end, which
    DeepSpec's rule also reads, are left out there rather than trained against a zero state."""
    i_ok = F.pad(valid.bool()[:, 1:] if teacher_valid is None else teacher_valid.bool()[:, 1:], (0, 1))  # position i + 1
    m = loss_mask.bool() & i_ok  # loss_mask[i] and a (stored) position i + 1
    return F.pad(m[:, step:], (0, step))


def eagle3_loss(drafter, h_steps: torch.Tensor, loss_mask: torch.Tensor, valid: torch.Tensor,
                target_final: torch.Tensor, cfg: LossConfig, step_decay: float = 0.8, normalization: str = "local_mean",
                teacher_valid: torch.Tensor | None = None) -> dict:
    """Soft CE against the target at every TTT step, step k weighted ``step_decay**k``.

    Step k's soft CE is summed over its supervised positions (``eagle3_supervised``) and divided by B x S
    (``local_mean``, DeepSpec's) or by its number of supervised positions (``valid_token_mean``).

    Args:
        h_steps: (B, K, S, d) drafter output per step (step k at t predicts token t+2+k);
        loss_mask, valid: (B, S); target_final: (B, S, d); teacher_valid: (B, S) where target_final is stored (None: all
        real positions; see ``eagle3_supervised``).
    Returns {"loss", "ce" (step-0 soft CE per supervised position), "acc_sum"/"acc_count" (K,), "tau_sum"/"tau_count"}.
    """
    B, K, S, d = h_steps.shape
    t = torch.arange(S, device=h_steps.device)
    total, acc_rows, ce0 = 0.0, [], None
    for k in range(K):
        ok = eagle3_supervised(loss_mask, valid, k, teacher_valid)  # (B, S)
        teacher_pos = (t + 1 + k).clamp(max=S - 1).expand(B, -1)
        h, tgt = h_steps[:, k][ok], torch.gather(target_final, 1, teacher_pos[..., None].expand(-1, -1, d))[ok]  # (n, d)
        parts = []
        for i in range(0, h.shape[0], cfg.chunk_positions):
            args = (drafter, h[i : i + cfg.chunk_positions], tgt[i : i + cfg.chunk_positions])
            recompute = cfg.recompute_logits and torch.is_grad_enabled()
            parts.append(checkpoint(_soft_ce_terms, *args, use_reentrant=False) if recompute else _soft_ce_terms(*args))
        ce, l1 = (torch.cat(x) for x in zip(*parts)) if parts else (h.new_zeros(0), h.new_zeros(0))
        step_ce = ce.sum() / (B * S if normalization == "local_mean" else max(ce.numel(), 1))
        total = total + step_decay**k * step_ce
        ce0 = (ce.sum() / max(ce.numel(), 1)).detach() if k == 0 else ce0
        acc = torch.zeros(B, S, device=h_steps.device)
        acc[ok] = (1 - 0.5 * l1.detach()).clamp(0, 1)
        acc_rows.append((acc, ok))
    acc = torch.stack([a for a, _ in acc_rows], -1)  # (B, S, K)
    ok = torch.stack([o for _, o in acc_rows], -1).float()
    rows = ok[..., 0].bool()  # positions supervised at step 0
    survive = torch.cumprod(acc * ok, dim=-1)[rows]  # (n0, K)
    if torch.is_grad_enabled() and not total.requires_grad:  # nothing supervised: zero loss, every parameter in the graph
        total = total + h_steps.sum() * 0.0
    return {"loss": total, "ce": ce0, "acc_sum": (acc * ok).sum((0, 1)), "acc_count": ok.sum((0, 1)),
            "tau_sum": (1 + survive.sum(-1)).sum(), "tau_count": torch.tensor(float(survive.shape[0]), device=h_steps.device)}
