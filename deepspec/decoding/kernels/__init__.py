"""Fused decoding steps over a batch of rows: Triton kernels on CUDA, the PyTorch reference elsewhere.

``markov_step`` and ``verify`` dispatch on the device of their inputs (and on Triton being
installed); both paths take the same explicit noise, so they return the same tokens.
"""
from __future__ import annotations

import torch

from deepspec.decoding.kernels import reference
from deepspec.decoding.kernels.reference import gumbel  # noqa: F401 (the noise transform both paths use)

try:  # Triton is optional (the `triton` extra); without it the reference path runs
    from deepspec.decoding.kernels import triton_kernels
except ImportError:  # pragma: no cover - depends on the environment
    triton_kernels = None


def use_triton(t: torch.Tensor) -> bool:
    return triton_kernels is not None and t.is_cuda


def markov_step(base, w1, w2, x, temperature, noise_g):
    impl = triton_kernels if use_triton(base) else reference
    return impl.markov_step(base, w1, w2, x, temperature, noise_g)


def verify(draft, q, p, lengths, u_accept, noise_u, greedy):
    impl = triton_kernels if use_triton(p) else reference
    return impl.verify(draft, q, p, lengths, u_accept, noise_u, greedy)
