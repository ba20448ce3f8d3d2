"""Drafters at inference: each keeps the context it has seen and proposes a block per round.

Bookkeeping shared by all: the session holds the target features of every token *before* the
anchor (the last emitted token, whose target features do not exist yet). ``extend`` appends the
features of newly verified tokens; ``draft`` proposes g tokens after the anchor and their draft
probabilities (for rejection sampling).

* Block drafters (DSpark, DFlash): one parallel backbone pass over [anchor, MASK...]; DSpark then
  samples left to right through its Markov head (x_0 = anchor); DFlash samples each slot alone.
* Eagle3: its step-0 keys/values are cached per position; a round runs step 0 on the new
  positions, then chains g steps at the last position (exactly the training-time-test pattern).
"""
from __future__ import annotations

import torch

from deepspec.decoding import kernels
from deepspec.decoding.verify import SamplingConfig, sample
from deepspec.drafters.attention import attend
from deepspec.drafters.blocks import Blocks


class BlockDrafterSession:
    def __init__(self, drafter, block_size: int | None = None):
        self.d = drafter
        self.g = block_size or drafter.cfg.block_size
        self.ctx: torch.Tensor | None = None  # (1, n, L*d) target features of the tokens before the anchor
        self.last_confidence: torch.Tensor | None = None  # (g,) raw sigmoid confidences of the last draft (DSpark)

    @property
    def scheduled_confidence(self) -> torch.Tensor | None:
        """The last draft's confidences after the drafter's Sequential Temperature Scaling (if fitted)."""
        temps = getattr(self.d, "confidence_temperatures", None)
        if self.last_confidence is None or not temps:
            return self.last_confidence
        from deepspec.evaluation.metrics import apply_temperatures

        return apply_temperatures(self.last_confidence[None], temps[: self.g])[0]

    def extend(self, features: torch.Tensor, tokens: torch.Tensor) -> None:
        """features (m, L*d) of m newly verified tokens (tokens unused: the anchor enters by embedding)."""
        f = features[None].to(self.d.fc.weight.dtype)
        self.ctx = f if self.ctx is None else torch.cat([self.ctx, f], dim=1)

    @torch.no_grad()
    def draft(self, anchor: int, sampling: SamplingConfig, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        d, g, dev = self.d, self.g, self.d.fc.weight.device
        n = self.ctx.shape[1]  # the anchor's position
        ids = torch.full((1, 1, g), d.cfg.mask_token_id, device=dev)
        ids[..., 0] = anchor
        blocks = Blocks(anchors=torch.tensor([[n]], device=dev), keep=torch.ones(1, 1, dtype=torch.bool, device=dev),
                        input_ids=ids, labels=ids, label_valid=ids.bool(), positions=n + torch.arange(g, device=dev).view(1, 1, g))
        h = d(self.ctx, torch.ones(1, n, dtype=torch.bool, device=dev), blocks)[0, 0]  # (g, d)
        base = d.lm_head(h)  # (g, V)
        markov = getattr(d, "markov_head", None)
        if markov is None:  # DFlash: every slot from the parallel pass alone
            q = sampling.probs(base)
            return sample(q, generator), (None if sampling.greedy else q)
        tokens, probs, conf, state = [], [], [], None
        prev = torch.tensor([anchor], device=dev)
        fused = markov.kind == "vanilla" and not sampling.top_k and sampling.top_p >= 1.0
        for k in range(g):  # sequential Markov sampling: x_k depends on x_{k-1}
            e = markov.embed_prev(prev)  # (1, r)
            if fused:  # gather W1[x], project by W2, add to U_k, sample, in one kernel on CUDA
                u = None if sampling.greedy else torch.rand(base.shape[-1], generator=generator).to(dev)
                tok, _, logits = kernels.markov_step(base[k], markov.markov_w1.weight, markov.markov_w2.weight,
                                                     int(prev), sampling.temperature, u)
                qk = sampling.probs(logits[None])
                prev = torch.tensor([tok], device=dev)
            else:
                z, state = markov.step(e, h[k : k + 1], state)
                qk = sampling.probs(base[k : k + 1] + markov.markov_w2(z))  # (1, V)
                prev = sample(qk, generator)
            tokens.append(prev)
            probs.append(qk)
            if d.confidence_head is not None:
                conf.append(torch.sigmoid(d.confidence_head(h[k : k + 1][None], e[None] if d.cfg.confidence_head_with_markov else None)).view(1))
        self.last_confidence = torch.cat(conf) if conf else None
        return torch.cat(tokens), (None if sampling.greedy else torch.cat(probs))


class Eagle3Session:
    def __init__(self, drafter, steps: int | None = None):
        self.d = drafter
        self.g = steps or drafter.cfg.ttt_steps
        self.features: torch.Tensor | None = None  # (n, L*d) target features of the tokens before the anchor
        self.tokens: list[int] = []  # tokens 0..n-1 (features t pair with token t+1; the anchor is token n)
        self.k0 = self.v0 = None  # (1, Hkv, T, hd) step-0 keys/values for positions 0..T-1
        self.h_last: torch.Tensor | None = None  # (1, d) step-0 output at the last position
        self.last_confidence = None

    def extend(self, features: torch.Tensor, tokens: torch.Tensor) -> None:
        """features (m, L*d) and the m tokens they belong to (the first is the current anchor)."""
        f = features.to(self.d.fc.weight.dtype)
        self.features = f if self.features is None else torch.cat([self.features, f])
        self.tokens += tokens.tolist()

    def _step0(self, anchor: int) -> None:
        """Run step 0 on every position whose next token is now known (t+1 <= anchor's position)."""
        d, m = self.d, self.d.midlayer
        dev = d.fc.weight.device
        done = 0 if self.k0 is None else self.k0.shape[2]
        n = self.features.shape[0]
        nxt = torch.tensor(self.tokens[1:] + [anchor], device=dev)[done:n]  # token t+1 for t in [done, n)
        g = d.fc(self.features[done:n])[None]  # (1, T_new, d)
        emb = d.embed_tokens(nxt)[None].to(g.dtype)
        pos = torch.arange(done, n, device=dev)[None]
        rope = d.rotary(emb, pos)
        x = torch.cat([m.input_layernorm(emb), m.hidden_norm(g)], dim=-1)
        q, k, v = m.self_attn.qkv(x, rope)
        self.k0 = k if self.k0 is None else torch.cat([self.k0, k], dim=2)
        self.v0 = v if self.v0 is None else torch.cat([self.v0, v], dim=2)
        T = n - done
        causal = torch.ones(T, n, dtype=torch.bool, device=dev).tril(diagonal=done)[None, None]
        out = attend(q, self.k0, self.v0, causal)
        h = g + m.self_attn.o_proj(out.transpose(1, 2).reshape(1, T, -1))
        self.h_last = (h + m.mlp(m.post_attention_layernorm(h)))[:, -1]  # (1, d)

    @torch.no_grad()
    def draft(self, anchor: int, sampling: SamplingConfig, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        d, m = self.d, self.d.midlayer
        self._step0(anchor)
        t = self.features.shape[0] - 1  # the chain runs at the last position
        h, ks, vs, tokens, probs = self.h_last, [], [], [], []
        for k in range(self.g):
            qk = sampling.probs(d.lm_head(d.norm(h)))  # (1, V)
            tok = sample(qk, generator)
            tokens.append(tok)
            probs.append(qk)
            if k == self.g - 1:
                break
            emb = d.embed_tokens(tok)[None].to(h.dtype)  # (1, 1, d)
            rope = d.rotary(emb, torch.tensor([[t + k + 1]], device=h.device))
            x = torch.cat([m.input_layernorm(emb), m.hidden_norm(h[:, None])], dim=-1)
            q, kk, vv = m.self_attn.qkv(x, rope)
            ks.append(kk)
            vs.append(vv)
            K = torch.cat([self.k0[:, :, : t + 1]] + ks, dim=2)
            V = torch.cat([self.v0[:, :, : t + 1]] + vs, dim=2)
            out = attend(q, K, V, None)  # prefix <= t and this position's chain: all visible
            hh = h[:, None] + m.self_attn.o_proj(out.transpose(1, 2).reshape(1, 1, -1))
            h = (hh + m.mlp(m.post_attention_layernorm(hh)))[:, 0]
        return torch.cat(tokens), (None if sampling.greedy else torch.cat(probs))
