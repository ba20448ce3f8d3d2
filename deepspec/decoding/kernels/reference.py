"""PyTorch reference of the fused decoding steps (runs everywhere; the Triton kernels must match it).

Randomness enters as explicit noise so that kernel and reference see the same draws:
sampling from softmax(l) is argmax(l + G) with G = -log(-log(U)) Gumbel noise (exact).

markov_step: one sequential-head step of DSpark, for one draft slot of N rows
    logits = base + W1[x] @ W2^T          (base (N, V), W1 (V', r), W2 (V, r), x (N,) the previous tokens)
    (with a reduced draft vocabulary V is the draft vocabulary, V' the target's, x a target id, and the
    returned token a draft id; the walk maps it to the next step's target id with d2t)
    token  = argmax(logits)                                     greedy
           = argmax(logits / T + G)                             sampling at temperature T
    (G = -log(-log U) is passed in: a block's noise is drawn, and transformed, once for all its slots)

verify: the acceptance rule over N rows, row n verifying its first L_n of g drafts
    accept d_k while k < L_n and U_k < p_k(d_k) / q_k(d_k); at the first rejection m the next
    token is argmax(log max(0, p_m - q_m) + G); if all L_n are accepted it is argmax(log p_{L_n} + G)
    (the bonus token, drawn at the position after the last *verified* draft).
    Greedy: accept while d_k = argmax p_k (k < L_n); next = argmax p_m.

Off CUDA the sampled steps draw by inversion instead (``draw_by_inversion``: one uniform per draw, the
first token whose cdf passes it): ``markov_walk_by_inversion`` and ``verify_by_inversion``. Same law,
other tokens for the same seed; the Gumbel twins above stay what the Triton kernels are checked against.
"""
from __future__ import annotations

import torch


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def markov_step(base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, temperature: float,
                noise_g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """base (N, V), x (N,), noise_g (N, V) Gumbel noise (``gumbel(U)``) or None -> (tokens (N,), logits (N, V) fp32)."""
    logits = torch.addmm(base.float(), w1[x].float(), w2.float().T)  # U_k + W1[x] W2^T  (N, V)
    if temperature == 0:
        return logits.argmax(-1), logits
    return (logits / temperature + noise_g).argmax(-1) if temperature != 1 else (logits + noise_g).argmax(-1), logits


def markov_walk(base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x0: torch.Tensor, temperature: float,
                noise_g: torch.Tensor | None, d2t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All g slots of ``markov_step`` for a block: base (N, g, V), x0 (N,) anchors, noise_g (N, g, V) or None
    -> (tokens (N, g), logits (N, g, V) fp32). Three ops per slot: the slot's keys are
    base/T + G + W1[x] W2^T / T in one addmm; the logits are rebuilt for the whole block in one product.
    Reduced draft vocabulary: V is the draft vocabulary, ``d2t`` (V,) its offsets; the argmax is a draft id and
    x_k = draft id + d2t[draft id] its target id, which the next W1 row and the returned tokens are."""
    base, w2t = base.float(), w2.float().T  # (N, g, V), (r, V)
    fp32_w1 = w1.dtype == torch.float32  # else the rows taken are cast (never the whole (V, r) table per round)
    keys = base if temperature == 0 else (base + noise_g if temperature == 1 else base / temperature + noise_g)
    alpha = 1.0 if temperature in (0, 1) else 1.0 / temperature
    x, tokens = x0, []
    for keys_k in keys.unbind(1):  # (N, V) per slot; a round is bound by op count on small drafters
        w1_x = w1[x] if fp32_w1 else w1[x].float()
        x = torch.addmm(keys_k, w1_x, w2t, alpha=alpha).argmax(-1)  # the walk: x_k from x_{k-1}
        x = x if d2t is None else x + d2t[x]
        tokens.append(x)
    tokens = torch.stack(tokens, 1)  # (N, g)
    prev = torch.cat([x0[:, None], tokens[:, :-1]], dim=1)
    return tokens, base + w1[prev].float() @ w2t


def markov_walk_by_inversion(base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x0: torch.Tensor, temperature: float,
                             u: torch.Tensor, d2t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled walk by inversion, one uniform per slot: base (N, g, V), x0 (N,), u (N, g) U[0, 1), temperature > 0
    -> (tokens (N, g), logits (N, g, V) fp32, q (N, g, V) the distributions drawn from).

    q_k = softmax((U_k + W1[x_{k-1}] W2^T) / T) and x_k = ``draw_by_inversion(q_k, u_k)``. The Gumbel walk above
    draws V numbers per slot (two logs each) where this draws one; on a CPU that draw costs more than the walk.
    Reduced draft vocabulary as in ``markov_walk``.
    """
    base, w2t = base.float(), w2.float().T
    fp32_w1 = w1.dtype == torch.float32
    alpha = 1.0 / temperature
    x, tokens, logits, probs = x0, [], [], []
    for base_k, u_k in zip(base.unbind(1), u.unbind(1)):  # (N, V), (N,) per slot
        l_k = torch.addmm(base_k, w1[x] if fp32_w1 else w1[x].float(), w2t)  # U_k + W1[x_{k-1}] W2^T
        q_k = torch.softmax(l_k if alpha == 1.0 else l_k * alpha, dim=-1)
        x = draw_by_inversion(q_k, u_k)  # the walk: x_k from x_{k-1}
        x = x if d2t is None else x + d2t[x]
        tokens.append(x)
        logits.append(l_k)
        probs.append(q_k)
    return torch.stack(tokens, 1), torch.stack(logits, 1), torch.stack(probs, 1)


def draw_by_inversion(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights (N, V) >= 0, not necessarily normalised, with a positive sum; u (N,) U[0, 1) -> (N,) token ids,
    v drawn with probability weights_v / sum(weights): the first v with cdf(v) > u cdf(V).

    u is scaled by 1 - 2^-23 so that u cdf(V) stays below cdf(V) after rounding: a token of weight 0 (masked, cut
    by top-k/top-p, underflowed, or outside a residual) is never drawn, at either end of the range."""
    cdf = weights.cumsum(-1)
    return torch.searchsorted(cdf, (u * (1.0 - 2.0 ** -23))[:, None] * cdf[:, -1:], right=True)[:, 0]


def accepted_drafts(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, lengths: torch.Tensor,
                    u_accept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled acceptance rule: draft (N, g), q (N, g, V), p (N, g+1, V), lengths (N,), u_accept (N, g)
    -> m (N,) drafts accepted and the distribution (N, V) the next token is drawn from: the residual
    max(0, p_m - q_m) after a rejection, p_m after all L_n verified drafts (the bonus). Not normalised."""
    N, g = draft.shape
    inside = torch.arange(g, device=p.device)[None] < lengths[:, None]  # (N, g) the verified slots
    d = draft[..., None]  # (N, g, 1): gathers p's first g slots without slicing them
    p_d, q_d = p.gather(-1, d)[..., 0], q.gather(-1, d)[..., 0]  # (N, g) p_k(d_k), q_k(d_k)
    m = ((u_accept < p_d / q_d.clamp_min(1e-30)) & inside).int().cumprod(1).sum(1)
    n = torch.arange(N, device=p.device)
    p_m, q_m = p[n, m], q[n, m.clamp(max=g - 1)]  # (N, V) each: the slot each row stopped at
    rejected = (m < lengths).float()[:, None]  # (N, 1): 0 leaves p_m itself, for the bonus
    dist = torch.addcmul(p_m, q_m, rejected, value=-1.0).clamp_min_(0)  # (p_m - q_m)^+, or p_m
    # p == q makes a rejection an event of probability 0; if rounding produced one anyway, draw from p
    return m, torch.where((dist.sum(-1) <= 0)[:, None], p_m, dist)


def verify(draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, lengths: torch.Tensor, u_accept: torch.Tensor | None,
           noise_u: torch.Tensor | None, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """draft (N, g), q (N, g, V), p (N, g+1, V) fp32 probabilities, lengths (N,) drafts verified per row,
    u_accept (N, g), noise_u (N, V) -> (m (N,) drafts accepted, next token (N,)). The twin of the Triton
    kernel: the next token by Gumbel-max over V uniforms."""
    N, g = draft.shape
    if greedy:
        inside = torch.arange(g, device=p.device)[None] < lengths[:, None]  # (N, g) the verified slots
        target = p.argmax(-1)  # (N, g+1)
        m = ((target[:, :g] == draft) & inside).int().cumprod(1).sum(1)
        return m, target.gather(1, m[:, None])[:, 0]
    m, dist = accepted_drafts(draft, q, p, lengths, u_accept)
    return m, (torch.log(dist) + gumbel(noise_u)).argmax(-1)


def verify_by_inversion(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, lengths: torch.Tensor,
                        u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled rule with g + 1 uniforms per row, u (N, g+1): the acceptance tests as in ``verify``, the next
    token by inversion of the residual's (or p's) cdf with the last one. Same law as ``verify``; on a CPU the V
    uniforms and logs (of many zeros: the slow path of log) of the Gumbel draw cost ~2x the whole rule."""
    g = draft.shape[1]
    m, dist = accepted_drafts(draft, q, p, lengths, u[:, :g])
    return m, draw_by_inversion(dist, u[:, g])
