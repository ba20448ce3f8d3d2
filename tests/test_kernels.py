"""Triton kernels against the PyTorch reference on random inputs, in the Triton interpreter on the CPU."""
from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1"  # set in conftest.py, before any kernel is decorated
triton = pytest.importorskip("triton")

from deepspec.decoding.kernels import reference, triton_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(triton_kernels is None, reason="triton not installed")


@pytest.mark.parametrize("V,R,temperature", [(300, 16, 0.0), (300, 16, 1.0), (1000, 24, 0.7), (64, 8, 1.3)])
def test_markov_step_matches_reference(V, R, temperature):
    N = 3  # one program per row
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        base, w1, w2 = torch.randn(N, V, generator=g), torch.randn(V, R, generator=g) * 0.3, torch.randn(V, R, generator=g) * 0.3
        x, u = torch.randint(V, (N,), generator=g), torch.rand(N, V, generator=g)
        noise = reference.gumbel(u)
        tok, logits = triton_kernels.markov_step(base, w1, w2, x, temperature, noise, block=128)
        rtok, rlogits = reference.markov_step(base, w1, w2, x, temperature, noise)
        assert torch.equal(tok, rtok)
        assert torch.allclose(logits, rlogits, atol=1e-4)


@pytest.mark.parametrize("greedy", [True, False])
def test_verify_matches_reference(greedy):
    V, G, N = 200, 5, 12
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(N, G + 1, V, generator=g) * 3, -1)
    q = torch.softmax(torch.randn(N, G, V, generator=g) * 3, -1)
    # drafts: mostly the target's argmax (so greedy accepts some), sometimes not
    draft = p[:, :G].argmax(-1)
    flip = torch.rand(N, G, generator=g) < 0.3
    draft = torch.where(flip, torch.randint(V, (N, G), generator=g), draft)
    if not greedy:
        q.scatter_(-1, draft[..., None], q.gather(-1, draft[..., None]) * 0.5)  # ratio > 1 for some, < 1 for others
        q = q / q.sum(-1, keepdim=True)
    lengths = torch.randint(0, G + 1, (N,), generator=g)  # scheduled prefixes, 0 (a plain step) included
    ua, u = torch.rand(N, G, generator=g), torch.rand(N, V, generator=g)
    got = triton_kernels.verify(draft, None if greedy else q, p, lengths, ua, u, greedy, block=64)
    ref = reference.verify(draft, None if greedy else q, p, lengths, ua, u, greedy)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (got, ref)
    assert len(set(ref[0].tolist())) >= 3  # several acceptance lengths were exercised
    assert bool((ref[0] <= lengths).all())


def test_verify_empty_residual_falls_back_to_p_like_the_reference():
    V, G = 50, 2
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, G + 1, V, generator=g), -1)
    q = p[:, :G].clone()  # p == q: the residual is empty everywhere
    draft = torch.tensor([[3, 4]])
    ua = torch.tensor([[1.0, 0.5]])  # force a rejection at position 0 despite ratio 1
    u = torch.rand(1, V, generator=g)
    lengths = torch.tensor([G])
    got, ref = triton_kernels.verify(draft, q, p, lengths, ua, u, False, block=16), reference.verify(draft, q, p, lengths, ua, u, False)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
def test_markov_walk_reference_equals_stepping_the_triton_kernel(temperature):
    """The block walk (three ops per slot) against one Triton step per slot, with the same noise."""
    N, g, V, R = 3, 4, 300, 16
    gen = torch.Generator().manual_seed(0)
    base, w1, w2 = torch.randn(N, g, V, generator=gen), torch.randn(V, R, generator=gen) * 0.5, torch.randn(V, R, generator=gen) * 0.5
    x0, noise = torch.randint(V, (N,), generator=gen), reference.gumbel(torch.rand(N, g, V, generator=gen))
    tokens, logits = reference.markov_walk(base, w1, w2, x0, temperature, None if temperature == 0 else noise)
    x = x0
    for k in range(g):
        x, lk = triton_kernels.markov_step(base[:, k], w1, w2, x, temperature, None if temperature == 0 else noise[:, k], block=64)
        assert torch.equal(x, tokens[:, k])
        assert torch.allclose(lk, logits[:, k], atol=1e-4)
