"""DSpark's sequential ("Markov") heads and confidence head.

A Markov head makes draft token k depend on token k-1 through a rank-r bias on the logits:

    logits_k = U_k + W2 z_k,   z_k = f(W1[x_{k-1}], h_k, state)

with x_0 the anchor token. The heads return z (B, g, r); the caller multiplies by W2 (N x r) in
vocabulary chunks, so no head ever materialises (B, g, N) on its own. W1 (V x r) is indexed by the
previous token's target id; W2 has a row per draft-vocabulary token (N = V at full vocabulary).

    vanilla: z_k = W1[x_{k-1}]
    gated:   z_k = sigmoid(gate_proj([h_k; W1[x_{k-1}]])) * W1[x_{k-1}]
    rnn:     [g; c; o] = joint_proj([s_{k-1}; W1[x_{k-1}]; h_k]),
             s_k = sigmoid(g) s_{k-1} + (1 - sigmoid(g)) tanh(c),  z_k = tanh(o),  s_0 = 0

Confidence head: c_k = sigmoid(proj([h_k; W1[x_{k-1}]])), the predicted probability that token k
survives verification given that tokens < k did.
"""
from __future__ import annotations

import torch
from torch import nn

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


class MarkovHead(nn.Module):
    """Names follow the reference checkpoint: markov_w1, markov_w2, gate_proj, joint_proj."""

    def __init__(self, vocab_size: int, d: int, rank: int, kind: str = "vanilla", draft_vocab_size: int | None = None):
        super().__init__()
        if kind not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov_head_type={kind!r} is not one of {MARKOV_HEAD_TYPES}")
        self.kind, self.rank = kind, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab_size or vocab_size, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(d + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + d, 3 * rank)

    def embed_prev(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """prev_tokens (..., g) -> W1[x_{k-1}] (..., g, r)."""
        return self.markov_w1(prev_tokens)

    def step(self, e_prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot: e_prev = W1[x_{k-1}] (N, r), h (N, d) -> z_k (N, r), new state."""
        if self.kind == "vanilla":
            return e_prev, None
        if self.kind == "gated":
            return torch.sigmoid(self.gate_proj(torch.cat([h, e_prev], -1))) * e_prev, None
        state = torch.zeros_like(e_prev) if state is None else state
        g, c, o = self.joint_proj(torch.cat([state, e_prev, h], -1)).chunk(3, dim=-1)
        state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(c)
        return torch.tanh(o), state

    def forward(self, prev_tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: prev_tokens (N, g), h (N, g, d) -> z (N, g, r)."""
        e = self.embed_prev(prev_tokens)
        if self.kind != "rnn":
            return self.step(e, h, None)[0]
        zs, state = [], None
        for k in range(e.shape[1]):
            z, state = self.step(e[:, k], h[:, k], state)
            zs.append(z)
        return torch.stack(zs, dim=1)


class ConfidenceHead(nn.Module):
    """c_k logit = proj([h_k; W1[x_{k-1}]]) (or proj(h_k) without the Markov input)."""

    def __init__(self, d: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(d + rank, 1)

    def forward(self, h: torch.Tensor, e_prev: torch.Tensor | None) -> torch.Tensor:
        """h (N, g, d), e_prev (N, g, r) or None -> logits (N, g)."""
        x = h if e_prev is None else torch.cat([h, e_prev], dim=-1)
        return self.proj(x).squeeze(-1)
