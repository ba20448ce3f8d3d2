"""Fused Triton kernels for the hot steps of a decoding round (batch size 1, one program each).

They compute exactly what ``reference.py`` computes, with the same explicit noise, but in one
launch that streams the vocabulary in blocks: the Markov step never materialises W2 @ W1[x] apart
from the logits it writes, and verification finds the first rejection and samples the residual
without building the residual distribution. Run on CPU tensors under ``TRITON_INTERPRET=1``
(tests); chosen on CUDA by ``deepspec.decoding.kernels``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel(u):
    u = tl.minimum(tl.maximum(u, 1e-20), 1.0 - 1e-7)
    return -tl.log(-tl.log(u))


@triton.jit
def _markov_step_kernel(base_ptr, w1_ptr, w2_ptr, u_ptr, logits_ptr, out_ptr, x, V, R, inv_t,
                        GREEDY: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, R_PAD)
    e = tl.load(w1_ptr + x * R + r, mask=r < R, other=0.0).to(tl.float32)  # W1[x] (R,)
    best_key = -float("inf")
    best_idx = 0
    best_scaled = 0.0
    run_max = -float("inf")
    run_sum = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        w = tl.load(w2_ptr + offs[:, None] * R + r[None, :], mask=mask[:, None] & (r[None, :] < R), other=0.0).to(tl.float32)
        logits = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.sum(w * e[None, :], axis=1)
        tl.store(logits_ptr + offs, logits, mask=mask)
        scaled = tl.where(mask, logits * inv_t, -float("inf"))
        blk_max = tl.max(scaled, 0)
        new_max = tl.maximum(run_max, blk_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(scaled - new_max), 0)
        run_max = new_max
        if GREEDY:
            key = tl.where(mask, logits, -float("inf"))
        else:
            key = tl.where(mask, scaled + _gumbel(tl.load(u_ptr + offs, mask=mask, other=0.5)), -float("inf"))
        blk_best = tl.max(key, 0)
        blk_idx = tl.argmax(key, 0)
        blk_scaled = tl.sum(tl.where(tl.arange(0, BLOCK) == blk_idx, scaled, 0.0), 0)
        better = blk_best > best_key
        best_idx = tl.where(better, start + blk_idx, best_idx)
        best_scaled = tl.where(better, blk_scaled, best_scaled)
        best_key = tl.maximum(best_key, blk_best)
    prob = tl.exp(best_scaled - run_max) / run_sum
    if GREEDY:
        prob = 1.0
    tl.store(out_ptr, best_idx.to(tl.float32))
    tl.store(out_ptr + 1, prob)


def markov_step(base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: int, temperature: float,
                noise_u: torch.Tensor | None, block: int = 64) -> tuple[int, float, torch.Tensor]:
    """Same contract as ``reference.markov_step``. A (block x rank) tile of W2 per iteration: keep it small."""
    V, R = w2.shape
    logits = torch.empty(V, dtype=torch.float32, device=base.device)
    out = torch.empty(2, dtype=torch.float32, device=base.device)
    greedy = temperature == 0
    u = noise_u if noise_u is not None else logits  # unused when greedy
    _markov_step_kernel[(1,)](base.contiguous(), w1.contiguous(), w2.contiguous(), u, logits, out, int(x), V, R,
                              0.0 if greedy else 1.0 / temperature, GREEDY=greedy, R_PAD=triton.next_power_of_2(R),
                              BLOCK=min(block, triton.next_power_of_2(V)))
    tok, prob = out.tolist()  # host sync: the next slot needs this token
    return int(tok), float(prob), logits


@triton.jit
def _verify_kernel(p_ptr, q_ptr, d_ptr, ua_ptr, u_ptr, out_ptr, G, V, GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    m = G
    for k in range(0, G):
        d = tl.load(d_ptr + k)
        if GREEDY:  # accept while the draft is the target's argmax
            best = -float("inf")
            arg = 0
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                row = tl.load(p_ptr + k * V + offs, mask=offs < V, other=-float("inf"))
                bm = tl.max(row, 0)
                arg = tl.where(bm > best, start + tl.argmax(row, 0), arg)
                best = tl.maximum(best, bm)
            accept = arg == d
        else:
            accept = tl.load(ua_ptr + k) < tl.load(p_ptr + k * V + d) / tl.maximum(tl.load(q_ptr + k * V + d), 1e-30)
        m = tl.where((m == G) & (accept == 0), k, m)
    best_key = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        pm = tl.load(p_ptr + m * V + offs, mask=mask, other=0.0)
        if GREEDY:
            key = tl.where(mask, pm, -float("inf"))
        else:
            in_block = (offs * 0 + m) < G  # m == G (all accepted): no q row, sample the bonus from p
            qm = tl.load(q_ptr + m * V + offs, mask=mask & in_block, other=0.0)
            dist = tl.maximum(pm - qm, 0.0)
            noise = _gumbel(tl.load(u_ptr + offs, mask=mask, other=0.5))
            key = tl.where(mask & (dist > 0), tl.log(dist) + noise, -float("inf"))
        bm = tl.max(key, 0)
        best_idx = tl.where(bm > best_key, start + tl.argmax(key, 0), best_idx)
        best_key = tl.maximum(best_key, bm)
    if best_key == -float("inf"):  # p == q up to rounding: empty residual, sample p[m] (as the reference does)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            pm = tl.load(p_ptr + m * V + offs, mask=mask, other=0.0)
            key = tl.where(mask & (pm > 0), tl.log(pm) + _gumbel(tl.load(u_ptr + offs, mask=mask, other=0.5)), -float("inf"))
            bm = tl.max(key, 0)
            best_idx = tl.where(bm > best_key, start + tl.argmax(key, 0), best_idx)
            best_key = tl.maximum(best_key, bm)
    tl.store(out_ptr, m)
    tl.store(out_ptr + 1, best_idx)


def verify(draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, u_accept: torch.Tensor | None,
           noise_u: torch.Tensor | None, greedy: bool, block: int = 1024) -> tuple[int, int]:
    """Same contract as ``reference.verify``."""
    G, V = draft.shape[0], p.shape[1]
    out = torch.empty(2, dtype=torch.int64, device=p.device)
    p = p.float().contiguous()
    q = p if q is None else q.float().contiguous()
    ua = u_accept if u_accept is not None else p
    u = noise_u if noise_u is not None else p
    _verify_kernel[(1,)](p, q, draft.to(torch.int64).contiguous(), ua, u, out, G, V, GREEDY=greedy,
                         BLOCK=min(block, triton.next_power_of_2(V)))
    m, tok = out.tolist()  # host sync: the round's length decides what comes next
    return int(m), int(tok)
