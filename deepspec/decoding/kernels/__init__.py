"""Fused decoding steps over a batch of rows: Triton kernels on CUDA, the PyTorch reference elsewhere.

``markov_walk`` and ``verify`` dispatch on the device of their inputs (and on Triton being
installed); both paths take the same explicit noise, so they return the same tokens.
``sample_walk`` and ``sample_verify`` draw their own randomness and sample differently per device
(Gumbel noise for the Triton kernels, inversion elsewhere): the same law, not the same tokens.
"""
from __future__ import annotations

import torch

from deepspec.decoding.kernels import reference

try:  # Triton is optional (the `triton` extra); without it the reference path runs
    from deepspec.decoding.kernels import triton_kernels
except ImportError:  # pragma: no cover - depends on the environment
    triton_kernels = None


def use_triton(t: torch.Tensor) -> bool:
    return triton_kernels is not None and t.is_cuda


def markov_walk(base, w1, w2, x0, temperature, noise_g, d2t=None):
    """A block's sequential walk: one Triton step per slot on CUDA, the three-op reference elsewhere.

    With a reduced draft vocabulary (``d2t`` (N,) offsets) a step samples a draft id, and the next step's
    W1 row is that token's target id: the kernel takes and the walk returns target ids (see ``reference``)."""
    if not use_triton(base):
        return reference.markov_walk(base, w1, w2, x0, temperature, noise_g, d2t)
    x, tokens, logits = x0, [], []
    for k in range(base.shape[1]):
        x, lk = triton_kernels.markov_step(base[:, k], w1, w2, x, temperature, None if noise_g is None else noise_g[:, k])
        x = x if d2t is None else x + d2t[x]  # draft id -> target id (one gather per slot)
        tokens.append(x)
        logits.append(lk)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def sample_walk(base, w1, w2, x0, temperature, generator, d2t=None, by_inversion: bool | None = None):
    """The walk at temperature > 0 with its own randomness -> (tokens (N, g), logits (N, g, V), q (N, g, V) or None).

    CUDA: Gumbel noise for the whole block in one draw and the Triton step per slot (q is left to the caller: one
    softmax over the block). Elsewhere: inversion, one uniform per slot (``reference.markov_walk_by_inversion``):
    on a CPU the block's N x g x V Gumbel numbers cost more than the walk itself (measured on the toy target,
    2 threads: 1.01 vs 0.85 ms per walk with q). ``by_inversion`` overrides the choice (tests run both laws on a CPU)."""
    from deepspec.decoding.verify import gumbel_noise, uniform

    N, g, _ = base.shape
    if by_inversion is None:
        by_inversion = not use_triton(base)
    if by_inversion:
        return reference.markov_walk_by_inversion(base, w1, w2, x0, temperature, uniform((N, g), generator, base.device), d2t)
    tokens, logits = markov_walk(base, w1, w2, x0, temperature, gumbel_noise(base.shape, generator, base.device), d2t)
    return tokens, logits, None


def sample_verify(draft, q, p, lengths, generator, by_inversion: bool | None = None):
    """The sampled acceptance rule with its own randomness -> (m (N,), next token (N,)).

    CUDA: g + V uniforms per row for the Triton kernel (the next token by Gumbel-max). Elsewhere: g + 1, the next
    token by inversion (``reference.verify_by_inversion``): on a CPU the Gumbel draw over V, with the log of a
    residual full of zeros (log's slow path), cost a quarter of the rule (measured at V = 4,096, g = 7, one row,
    2 threads: ``verify_block`` 535 -> 415 us). ``by_inversion`` overrides the choice (tests run both laws on a CPU)."""
    from deepspec.decoding.verify import uniform

    N, g = draft.shape
    if by_inversion is None:
        by_inversion = not use_triton(p)
    if by_inversion:
        return reference.verify_by_inversion(draft, q, p, lengths, uniform((N, g + 1), generator, p.device))
    u = uniform((N, g + p.shape[-1]), generator, p.device)
    return verify(draft, q, p, lengths, u[:, :g], u[:, g:], False)


def verify(draft, q, p, lengths, u_accept, noise_u, greedy):
    impl = triton_kernels if use_triton(p) else reference
    return impl.verify(draft, q, p, lengths, u_accept, noise_u, greedy)
