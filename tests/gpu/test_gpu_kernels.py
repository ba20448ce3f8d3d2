"""The Triton kernels, compiled for the GPU, against the PyTorch reference at real shapes.

Vocabularies of Qwen3 (151,936), Gemma-3/4 (262,144) and a reduced draft vocabulary (32,768 of Qwen3's); blocks of 7
and 16; 1 to 64 rows; fp32 and bf16 logits and weights. Both sides take the same explicit noise, so tokens must be
equal; the one allowance is a near-tie: where fp32 sums in another order flip an argmax, the two tokens' keys must
agree within ``KEY_ATOL`` (a real error moves a key by far more).
"""
from __future__ import annotations

import pytest
import torch

from deepspec.decoding import kernels
from deepspec.decoding.kernels import reference

DEV = "cuda"
KEY_ATOL = 1e-4
RANK = 256
VOCABS = [(151_936, None), (262_144, None), (151_936, 32_768)]  # (target V, draft vocabulary N or None)


def same_or_near_tie(keys: torch.Tensor, got: torch.Tensor, ref: torch.Tensor) -> bool:
    """keys (N, V) the argmax's scores; got, ref (N,) tokens -> every row equal, or its two keys within KEY_ATOL."""
    k_got, k_ref = keys.gather(-1, got[:, None])[:, 0], keys.gather(-1, ref[:, None])[:, 0]
    return bool(((got == ref) | ((k_got - k_ref).abs() <= KEY_ATOL)).all())


def draft_vocab_offsets(V: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """d2t (N,): draft id i -> target id i + d2t[i], N sorted target ids."""
    ids = torch.sort(torch.randperm(V, device=DEV, generator=gen)[:N]).values
    return ids - torch.arange(N, device=DEV)


@pytest.mark.parametrize("temperature", [0.0, 0.7])  # greedy; sampled with 1/T scaling (T = 1 is the same code)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("g", [7, 16])
@pytest.mark.parametrize("V,N", VOCABS, ids=["V151936", "V262144", "V151936-N32768"])
def test_markov_walk_on_cuda_matches_the_reference_slot_by_slot(V, N, g, rows, dtype, temperature):
    """kernels.markov_walk (one Triton step per slot on CUDA) against reference.markov_step fed the kernel's previous
    token: tokens (draft ids mapped to target ids) and fp32 logits, every slot."""
    gen = torch.Generator(device=DEV).manual_seed(g * 1000 + rows)
    Vd = N or V
    base = (torch.randn(rows, g, Vd, device=DEV, generator=gen) * 2).to(dtype)
    w1 = (torch.randn(V, RANK, device=DEV, generator=gen) * 0.05).to(dtype)
    w2 = (torch.randn(Vd, RANK, device=DEV, generator=gen) * 0.05).to(dtype)
    d2t = draft_vocab_offsets(V, N, gen) if N else None
    x0 = torch.randint(0, V, (rows,), device=DEV, generator=gen)
    noise = None if temperature == 0 else reference.gumbel(torch.rand(rows, g, Vd, device=DEV, generator=gen))
    tokens, logits = kernels.markov_walk(base, w1, w2, x0, temperature, noise, d2t)
    assert tokens.shape == (rows, g) and logits.shape == (rows, g, Vd) and logits.dtype == torch.float32
    prev = x0
    for k in range(g):
        ref_draft_id, ref_logits = reference.markov_step(base[:, k], w1, w2, prev, temperature, None if noise is None else noise[:, k])
        assert torch.allclose(logits[:, k], ref_logits, atol=1e-3, rtol=1e-4), (k, (logits[:, k] - ref_logits).abs().max())
        got_draft_id = tokens[:, k]
        if d2t is not None:  # the walk returns target ids: back to draft ids through the sorted map
            target_ids = torch.arange(Vd, device=DEV) + d2t
            got_draft_id = torch.searchsorted(target_ids, tokens[:, k].contiguous()).clamp(max=Vd - 1)
            assert torch.equal(target_ids[got_draft_id], tokens[:, k]), k
        keys = ref_logits if temperature == 0 else ref_logits / temperature + noise[:, k]
        assert same_or_near_tie(keys, got_draft_id, ref_draft_id), k
        prev = tokens[:, k]


def verify_inputs(V: int, g: int, rows: int, dtype: torch.dtype, greedy: bool):
    """Target scores (N, g+1, V) from ``dtype`` logits (greedy: the logits themselves, as the loop passes them; else
    fp32 probabilities), draft probabilities q, drafts that are often the target's argmax, ragged verified lengths."""
    gen = torch.Generator(device=DEV).manual_seed(V + g + rows)
    logits = (torch.randn(rows, g + 1, V, device=DEV, generator=gen) * 3).to(dtype)
    probs = torch.softmax(logits.float(), -1)
    p = logits if greedy else probs
    q = torch.softmax(torch.randn(rows, g, V, device=DEV, generator=gen) * 3, -1)
    draft = logits[:, :g].float().argmax(-1)
    flip = torch.rand(rows, g, device=DEV, generator=gen) < 0.3
    draft = torch.where(flip, torch.randint(0, V, (rows, g), device=DEV, generator=gen), draft)
    q.scatter_(-1, draft[..., None], probs[:, :g].gather(-1, draft[..., None]) * 1.5)  # p/q ~ 2/3 at the drafts
    q = q / q.sum(-1, keepdim=True)
    lengths = torch.randint(0, g + 1, (rows,), device=DEV, generator=gen)
    ua, u = torch.rand(rows, g, device=DEV, generator=gen), torch.rand(rows, V, device=DEV, generator=gen)
    return draft, q, p, lengths, ua, u


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("g", [7, 16])
@pytest.mark.parametrize("V", [151_936, 262_144, 32_768])
def test_verify_on_cuda_matches_the_reference(V, g, rows, dtype, greedy):
    """kernels.verify (the Triton kernel on CUDA) against reference.verify: drafts accepted equal; next token equal or a
    near-tie of log(residual or p) + Gumbel noise (greedy: of the scores themselves)."""
    draft, q, p, lengths, ua, u = verify_inputs(V, g, rows, dtype, greedy)
    m, tok = kernels.verify(draft, None if greedy else q, p, lengths, ua, u, greedy)
    ref_m, ref_tok = reference.verify(draft, None if greedy else q, p, lengths, ua, u, greedy)
    assert torch.equal(m, ref_m), (m, ref_m)
    assert bool((m <= lengths).all())
    n = torch.arange(rows, device=DEV)
    if greedy:
        keys = p[n, m].float()
    else:
        _, dist = reference.accepted_drafts(draft, q, p, lengths, ua)
        keys = torch.log(dist) + reference.gumbel(u)
    assert same_or_near_tie(keys, tok, ref_tok)
    if rows == 64:
        assert len(set(ref_m.tolist())) >= 3  # several acceptance lengths were exercised


def test_sampled_walk_and_verify_run_their_cuda_paths():
    """The dispatchers pick Triton for CUDA tensors (Gumbel noise drawn on the device), not the inversion fallback."""
    V, g = 151_936, 7
    gen = torch.Generator(device=DEV).manual_seed(0)
    base = torch.randn(2, g, V, device=DEV, generator=gen)
    w1 = w2 = torch.randn(V, RANK, device=DEV, generator=gen) * 0.05
    tokens, logits, q = kernels.sample_walk(base, w1, w2, torch.zeros(2, dtype=torch.long, device=DEV), 1.0, gen)
    assert kernels.use_triton(base) and q is None and tokens.is_cuda and logits.shape == (2, g, V)
    p = torch.softmax(torch.randn(2, g + 1, V, device=DEV, generator=gen), -1)
    m, nxt = kernels.sample_verify(tokens, torch.softmax(logits, -1), p, torch.full((2,), g, device=DEV), gen)
    assert m.is_cuda and bool((m <= g).all()) and bool((nxt < V).all())
