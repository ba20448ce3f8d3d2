"""Sampling transforms and the verification rule of speculative decoding (PyTorch reference).

Both sides of the acceptance ratio go through the same ``SamplingConfig.probs`` (temperature,
top-k, top-p) in fp32. ``verify_block`` is the lossless rule of Leviathan et al. / Chen et al.:

    for k = 1..L:  accept d_k with probability min(1, p_k(d_k) / q_k(d_k))
                   on rejection: emit a token from norm(max(0, p_k - q_k)) and stop
    all accepted:  emit a bonus token from p_{L+1}

where L <= g is the number of drafts the row verifies (all of them, or the scheduler's prefix).

Greedy (temperature 0) reduces to: accept while d_k = argmax p_k, then emit argmax p at the
first mismatch (or the bonus position). Either way the emitted sequence is distributed exactly
like the target's own sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deepspec.decoding.kernels.reference import draw_by_inversion


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set with this much probability (1 = off)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> fp32 probabilities after temperature, top-k and top-p (in that order, like HF's warpers).

        Ties: top-k keeps every token tied with the k-th; top-p keeps the token that crosses top_p and, of tokens tied
        at that edge, the lower ids (HF's ascending sort keeps the higher ones). tests/sampling_reference.py has the
        same law written independently."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        if self.temperature != 1.0:  # dividing by 1 changes no bit: skip the pass over (..., V)
            logits = logits / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)  # ties at the edge: the lower ids stay, one law
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # keep the first token that crosses top_p
            probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(..., V) -> (...) token ids drawn from ``probs``, by inversion: one uniform per row, the first token whose
    cdf passes it (``kernels.reference.draw_by_inversion``; tokens of probability 0 are never drawn).

    Not ``torch.multinomial`` nor Gumbel-max: on a CPU every step of plain and speculative decoding samples, and
    inversion does one cumsum where Gumbel-max draws V uniforms and takes three logs (the log of the zeros that
    top-k/top-p leave is log's slow path), and multinomial is slower still (measured at V = 4,096, one row,
    2 threads, AMD EPYC: 98 vs 142 vs 190 us per call; a call this small is bound by its op count).
    """
    flat = probs.float().reshape(-1, probs.shape[-1])
    return draw_by_inversion(flat, uniform((flat.shape[0],), generator, probs.device)).view(probs.shape[:-1])


def next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(..., V) logits -> (...) tokens drawn from ``sampling.probs(logits)`` (greedy: the argmax, no draw)."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample(sampling.probs(logits), generator)


def uniform(shape: tuple, generator: torch.Generator | None, device) -> torch.Tensor:
    """U(0, 1) noise drawn from ``generator`` (on its own device), moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device if generator is not None else device).to(device)


def gumbel_noise(shape: tuple, generator: torch.Generator | None, device) -> torch.Tensor:
    """Gumbel(0, 1) noise G = -log(-log U), U ~ U[0, 1) (argmax(logits / T + G) samples softmax(logits / T)).

    From uniforms rather than ``exponential_`` (G = -log E): on a CPU that draw is 4x slower (1.1 ms vs
    0.29 ms for a block of 8 x 4,096). U = 0 is clamped; U < 1 always, so -log U > 0 and G is finite.
    """
    return uniform(shape, generator, device).clamp_min_(1e-20).log_().neg_().log_().neg_()


def verify_block(draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, lengths: torch.Tensor,
                 generator: torch.Generator | None, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of each row's verified drafts and pick the row's next token.

    Args:
        draft: (N, g) drafted tokens; q: (N, g, V) their draft probabilities (None when greedy);
        p: (N, g+1, V) target probabilities at [anchor, d_1, ..., d_g] (greedy: any scores with the same argmax);
        lengths: (N,) drafts each row verifies (a scheduler may verify a prefix: 0..g).
    Returns: m (N,) drafts accepted and next (N,) the token emitted after them. The fused kernel
    runs on CUDA, the PyTorch reference elsewhere (``kernels.sample_verify``).
    """
    from deepspec.decoding import kernels

    if greedy:
        return kernels.verify(draft, None, p, lengths, None, None, True)
    return kernels.sample_verify(draft, q, p, lengths, generator)
