"""Fused Triton kernels for the hot steps of a decoding round: one program per row of the batch.

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
def _markov_step_kernel(base_ptr, w1_ptr, w2_ptr, g_ptr, logits_ptr, x_ptr, out_ptr, V, R, inv_t,
                        GREEDY: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base_ptr += row * V
    g_ptr += row * V
    logits_ptr += row * V
    x = tl.load(x_ptr + row)
    r = tl.arange(0, R_PAD)
    e = tl.load(w1_ptr + x * R + r, mask=r < R, other=0.0).to(tl.float32)  # W1[x] (R,)
    best_key = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        w = tl.load(w2_ptr + offs[:, None] * R + r[None, :], mask=mask[:, None] & (r[None, :] < R), other=0.0).to(tl.float32)
        logits = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.sum(w * e[None, :], axis=1)
        tl.store(logits_ptr + offs, logits, mask=mask)
        scaled = tl.where(mask, logits * inv_t, -float("inf"))
        if GREEDY:
            key = tl.where(mask, logits, -float("inf"))
        else:
            key = tl.where(mask, scaled + tl.load(g_ptr + offs, mask=mask, other=0.0), -float("inf"))
        blk_best = tl.max(key, 0)
        blk_idx = tl.argmax(key, 0)
        better = blk_best > best_key
        best_idx = tl.where(better, start + blk_idx, best_idx)
        best_key = tl.maximum(best_key, blk_best)
    tl.store(out_ptr + row, best_idx)


def markov_step(base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, temperature: float,
                noise_g: torch.Tensor | None, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.markov_step``. A (block x rank) tile of W2 per iteration: keep it small."""
    N, V = base.shape
    R = w2.shape[1]
    logits = torch.empty(N, V, dtype=torch.float32, device=base.device)
    out = torch.empty(N, dtype=torch.int64, device=base.device)
    greedy = temperature == 0
    noise = noise_g.contiguous() if noise_g is not None else logits  # unused when greedy
    _markov_step_kernel[(N,)](base.contiguous(), w1.contiguous(), w2.contiguous(), noise, logits, x.to(torch.int64).contiguous(),
                              out, V, R, 0.0 if greedy else 1.0 / temperature, GREEDY=greedy,
                              R_PAD=triton.next_power_of_2(R), BLOCK=min(block, triton.next_power_of_2(V)))
    return out, logits


@triton.jit
def _verify_kernel(p_ptr, q_ptr, d_ptr, len_ptr, ua_ptr, u_ptr, m_ptr, tok_ptr, G, V, GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    p_ptr += row * (G + 1) * V
    q_ptr += row * G * V
    d_ptr += row * G
    ua_ptr += row * G
    u_ptr += row * V
    L = tl.load(len_ptr + row)  # drafts this row verifies
    m = L
    for k in range(0, G):
        d = tl.load(d_ptr + k)
        if GREEDY:  # accept while the draft is the target's argmax
            best = -float("inf")
            arg = 0
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                row_p = tl.load(p_ptr + k * V + offs, mask=offs < V, other=-float("inf"))
                bm = tl.max(row_p, 0)
                arg = tl.where(bm > best, start + tl.argmax(row_p, 0), arg)
                best = tl.maximum(best, bm)
            accept = arg == d
        else:
            accept = tl.load(ua_ptr + k) < tl.load(p_ptr + k * V + d) / tl.maximum(tl.load(q_ptr + k * V + d), 1e-30)
        m = tl.where((m == L) & (k < L) & (accept == 0), k, m)
    best_key = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        pm = tl.load(p_ptr + m * V + offs, mask=mask, other=0.0)
        if GREEDY:
            key = tl.where(mask, pm, -float("inf"))
        else:
            rejected = (offs * 0 + m) < L  # m == L (all verified accepted): no residual, sample the bonus from p
            qm = tl.load(q_ptr + m * V + offs, mask=mask & rejected, other=0.0)
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
    tl.store(m_ptr + row, m)
    tl.store(tok_ptr + row, best_idx)


def verify(draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, lengths: torch.Tensor, u_accept: torch.Tensor | None,
           noise_u: torch.Tensor | None, greedy: bool, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.verify``."""
    N, G = draft.shape
    V = p.shape[-1]
    m = torch.empty(N, dtype=torch.int64, device=p.device)
    tok = torch.empty(N, dtype=torch.int64, device=p.device)
    p = p.float().contiguous()
    q = p if q is None else q.float().contiguous()
    ua = u_accept.contiguous() if u_accept is not None else p
    u = noise_u.contiguous() if noise_u is not None else p
    _verify_kernel[(N,)](p, q, draft.to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous(), ua, u, m, tok, G, V,
                         GREEDY=greedy, BLOCK=min(block, triton.next_power_of_2(V)))
    return m, tok
