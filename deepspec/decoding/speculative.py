"""The speculative decoding loop (batch size 1) and the plain autoregressive baseline.

A round, after the speculative sampling algorithm (Leviathan et al. 2023, Chen et al. 2023):

    1. draft   the drafter proposes d_1..d_g after the anchor (the last emitted token)
    2. verify  one target forward over [anchor, d_1..d_g] on top of its KV cache
    3. accept  ``verify_block``: the longest accepted prefix d_1..d_m and the next token
               (a correction from the residual, or the bonus token when all g are accepted)
    4. commit  crop the target's cache to the accepted tokens, feed their target features to
               the drafter; the next token becomes the new anchor

Both loops stop at ``max_new_tokens`` or after emitting ``eos_token_id``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from deepspec.decoding.verify import SamplingConfig, sample, verify_block
from deepspec.target import TargetModel


@dataclass
class GenerationResult:
    tokens: list[int]
    accepted_per_round: list[int] = field(default_factory=list)  # m per round (tokens per round = m + 1)
    confidences: list[list[float]] = field(default_factory=list)  # DSpark: c_1..c_g of every round
    seconds: dict = field(default_factory=lambda: {"draft": 0.0, "verify": 0.0, "other": 0.0})

    @property
    def tau(self) -> float:
        """Tokens emitted per round, bonus/correction token included."""
        return sum(m + 1 for m in self.accepted_per_round) / max(len(self.accepted_per_round), 1)


def _prefill(target: TargetModel, prompt: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    layer_hidden, final = target(prompt[None], past_key_values=cache)
    return layer_hidden[0], target.lm_head(final[0, -1:])  # (P, L*d), (1, V)


@torch.no_grad()
def autoregressive_generate(target: TargetModel, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                            eos_token_id: int | None = None, generator: torch.Generator | None = None) -> GenerationResult:
    """Plain decoding with the same sampling transforms (the reference the speculative loop must match)."""
    cache = DynamicCache()
    _, logits = _prefill(target, prompt, cache)
    out: list[int] = []
    while True:
        tok = int(sample(sampling.probs(logits), generator)[0])
        out.append(tok)
        if len(out) >= max_new_tokens or tok == eos_token_id:
            return GenerationResult(out)
        _, final = target(torch.tensor([[tok]], device=target.device), past_key_values=cache)
        logits = target.lm_head(final[0])


@torch.no_grad()
def speculative_generate(target: TargetModel, session, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                         eos_token_id: int | None = None, generator: torch.Generator | None = None,
                         verify_len: Callable[[torch.Tensor | None], int] | None = None) -> GenerationResult:
    """Speculative decoding of one prompt (``prompt`` (P,) token ids) with a drafter session.

    ``verify_len(confidences)`` may shorten a round to a prefix of the drafts (a scheduler's choice,
    e.g. ``evaluation.scheduler.prefix_schedule``); verifying a prefix keeps decoding exact.
    """
    sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)
    res = GenerationResult([])
    cache = DynamicCache()
    features, logits = _prefill(target, prompt, cache)
    anchor = int(sample(sampling.probs(logits), generator)[0])
    res.tokens.append(anchor)
    session.extend(features, prompt)
    while len(res.tokens) < max_new_tokens and anchor != eos_token_id:  # the prefill's token may end it
        t0 = time.perf_counter()
        drafts, q = session.draft(anchor, sampling, generator)  # 1. draft (g,), (g, V)
        if verify_len is not None:
            L = verify_len(getattr(session, "scheduled_confidence", None))
            drafts, q = drafts[:L], None if q is None else q[:L]
        sync()
        t1 = time.perf_counter()
        block = torch.cat([torch.tensor([anchor], device=target.device), drafts.to(target.device)])
        layer_hidden, final = target(block[None], past_key_values=cache)  # 2. verify (1, g+1, .)
        p = sampling.probs(target.lm_head(final[0]))  # (g+1, V)
        sync()
        t2 = time.perf_counter()
        m, nxt = verify_block(drafts.to(p.device), None if q is None else q.to(p.device), p, generator, sampling.greedy)  # 3.
        if m < len(drafts):  # 4. commit: keep anchor + m drafts (transformers 5 crops by a negative count)
            cache.crop(m - len(drafts))
        session.extend(layer_hidden[0, : m + 1], block[: m + 1])
        res.accepted_per_round.append(m)
        if getattr(session, "last_confidence", None) is not None:
            res.confidences.append(session.last_confidence.float().tolist())
        stop = False
        for tok in drafts[:m].tolist() + [nxt]:
            res.tokens.append(tok)
            stop = tok == eos_token_id or len(res.tokens) >= max_new_tokens
            if stop:
                break
        anchor = nxt
        t3 = time.perf_counter()
        res.seconds["draft"] += t1 - t0
        res.seconds["verify"] += t2 - t1
        res.seconds["other"] += t3 - t2
        if stop:
            break
    return res


def make_session(drafter):
    """The inference session matching a drafter module."""
    from deepspec.decoding.drafter_sessions import BlockDrafterSession, Eagle3Session
    from deepspec.drafters import Eagle3Drafter

    return Eagle3Session(drafter) if isinstance(drafter, Eagle3Drafter) else BlockDrafterSession(drafter)


@torch.no_grad()
def speculative_generate_batch(target: TargetModel, sessions: list, prompts: list[torch.Tensor], max_new_tokens: int,
                               sampling: SamplingConfig, eos_token_id: int | None = None,
                               generator: torch.Generator | None = None) -> list[GenerationResult]:
    """Several prompts at once: one batched target forward verifies every row's block per round.

    Rows accept different numbers of drafts (ragged). The batched KV cache grows by g+1 positions
    per round for every row; the positions a row rejected stay in the cache as holes that the
    attention mask hides, and explicit position ids count only a row's real tokens, so each row
    computes exactly what it would alone. Finished rows ride along with their mask at zero.
    Drafting runs per row (each session has its own context).
    """
    dev, B = target.device, len(prompts)
    P = max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    mask = torch.zeros(B, P, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token at column P-1
        ids[i, P - len(p):], mask[i, P - len(p):] = p.to(dev), 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cache = DynamicCache()
    layer_hidden, final = target.decoder_with_positions(ids, mask, pos, cache)
    probs = sampling.probs(target.lm_head(final[:, -1]))  # (B, V)
    results = [GenerationResult([int(sample(probs[i], generator))]) for i in range(B)]
    anchors = [r.tokens[0] for r in results]
    lengths = [len(p) for p in prompts]  # real tokens per row (= position of the anchor)
    for i, s in enumerate(sessions):
        s.extend(layer_hidden[i, P - len(prompts[i]):], prompts[i])
    active = [anchors[i] != eos_token_id and max_new_tokens > 1 for i in range(B)]
    while any(active):
        drafts, qs = [], []
        for i, s in enumerate(sessions):  # 1. draft (inactive rows re-draft harmlessly; their mask hides them)
            d, q = s.draft(anchors[i], sampling, generator) if active[i] else (torch.zeros(sessions[0].g, dtype=torch.long), None)
            drafts.append(d.to(dev))
            qs.append(q)
        g = len(drafts[0])
        block = torch.stack([torch.cat([torch.tensor([anchors[i]], device=dev), drafts[i]]) for i in range(B)])  # (B, g+1)
        block_mask = torch.tensor(active, device=dev, dtype=torch.long)[:, None].expand(B, g + 1)
        mask = torch.cat([mask, block_mask], dim=1)
        block_pos = torch.tensor(lengths, device=dev)[:, None] + torch.arange(g + 1, device=dev)
        layer_hidden, final = target.decoder_with_positions(block, mask, block_pos, cache)  # 2. verify all rows
        p_all = sampling.probs(target.lm_head(final))  # (B, g+1, V)
        for i in range(B):
            if not active[i]:
                continue
            m, nxt = verify_block(drafts[i], qs[i], p_all[i], generator, sampling.greedy)  # 3. accept per row
            if m < g:  # 4. commit: the rejected positions become holes
                mask[i, m - g:] = 0
            sessions[i].extend(layer_hidden[i, : m + 1], block[i, : m + 1])
            lengths[i] += m + 1
            results[i].accepted_per_round.append(m)
            for tok in drafts[i][:m].tolist() + [nxt]:
                results[i].tokens.append(tok)
                if tok == eos_token_id or len(results[i].tokens) >= max_new_tokens:
                    active[i] = False
                    break
            anchors[i] = nxt
    return results
