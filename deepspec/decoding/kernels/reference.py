"""PyTorch reference of the fused decoding steps (runs everywhere; the Triton kernels must match it).

Randomness enters as explicit noise so that kernel and reference see the same draws:
sampling from softmax(l) is argmax(l + G) with G = -log(-log(U)) Gumbel noise (exact).

markov_step: one sequential-head step of DSpark, for one draft slot
    logits = base + W2 @ W1[x]            (base (V,), W1 (V', r), W2 (V, r), x the previous token)
    token  = argmax(logits)                                     greedy
           = argmax(logits / T + G)                             sampling at temperature T
    prob   = softmax(logits / T)[token]   (1.0 when greedy)

verify: the acceptance rule over a block of g drafts
    accept d_k while U_k < p_k(d_k) / q_k(d_k); at the first rejection m the next token is
    argmax(log max(0, p_m - q_m) + G); if all g are accepted it is argmax(log p_g + G).
    Greedy: accept while d_k = argmax p_k; next = argmax p_m.
"""
from __future__ import annotations

import torch


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def markov_step(base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: int, temperature: float,
                noise_u: torch.Tensor | None) -> tuple[int, float, torch.Tensor]:
    """-> (token, its probability, logits (V,) fp32)."""
    logits = base.float() + w2.float() @ w1[x].float()
    if temperature == 0:
        return int(logits.argmax()), 1.0, logits
    scaled = logits / temperature
    token = int((scaled + gumbel(noise_u)).argmax())
    return token, float(torch.softmax(scaled, -1)[token]), logits


def verify(draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, u_accept: torch.Tensor | None,
           noise_u: torch.Tensor | None, greedy: bool) -> tuple[int, int]:
    """draft (g,), q (g, V), p (g+1, V) fp32 probabilities, u_accept (g,), noise_u (V,) -> (m, next token)."""
    g = draft.shape[0]
    if greedy:
        target = p.argmax(-1)
        m = int((target[:g] == draft).int().cumprod(0).sum())
        return m, int(target[m])
    rows = torch.arange(g, device=p.device)
    ratio = p[rows, draft] / q[rows, draft].clamp_min(1e-30)
    m = int((u_accept < ratio).int().cumprod(0).sum())
    dist = p[m] if m == g else (p[m] - q[m]).clamp_min(0)
    if m < g and float(dist.sum()) <= 0:  # p == q: a rejection had probability 0; guard rounding
        dist = p[m]
    return m, int((torch.log(dist) + gumbel(noise_u)).argmax())
