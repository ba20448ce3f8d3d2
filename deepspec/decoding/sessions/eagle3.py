"""Eagle3 at inference: step-0 keys/values cached per position, then a chain of g steps.

Step 0 at position t reads the target's features at t and the token at t+1, so a position is
computed once, when its next token is known: the row's queued positions run in one batched
pass at its next draft (the last queued position pairs with the anchor). The chain then runs g
steps at the last position, each attending to every cached step-0 key and to the chain so far,
exactly the training-time-test pattern (``deepspec/drafters/eagle3.py``). With a reduced draft
vocabulary each step samples a draft id and feeds back (and returns) its target id, with q over the
full vocabulary (zeros outside the draft ids).
"""
from __future__ import annotations

import torch

from deepspec.decoding.sessions.draft import Draft, top_probability
from deepspec.decoding.sessions.state import IncrementalSession, RaggedKV, all_rows, scatter_index
from deepspec.decoding.verify import SamplingConfig, sample
from deepspec.drafters.attention import attend


class Eagle3Session(IncrementalSession):
    def __init__(self, drafter, batch_size: int):
        super().__init__(drafter, batch_size, drafter.cfg.ttt_steps)
        attn, w = drafter.midlayer.self_attn, drafter.fc.weight
        self.kv = RaggedKV(batch_size, attn.num_kv_heads, attn.head_dim, w.dtype, w.device)  # step-0 keys/values

    def _step0(self, rows: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 0 on the rows' queued positions -> h at each row's last position (N, d), K, V (N, Hkv, C, hd)."""
        d, m = self.d, self.d.midlayer
        feats, toks, counts = self.pending.take(rows)  # (N, T, L*d), (N, T), (N,)
        if bool((counts == 0).any()):
            raise RuntimeError("Eagle3Session.draft: a row has no new verified token since its last draft")
        N, T = toks.shape
        start = self.length[rows]
        pos = start[:, None] + torch.arange(T, device=toks.device)  # (N, T)
        nxt = torch.cat([toks[:, 1:], toks.new_zeros(N, 1)], dim=1)  # token t+1 of every queued position t ...
        nxt[torch.arange(N, device=toks.device), counts - 1] = anchors  # ... the last one's is the anchor
        g0 = d.fc(feats)  # (N, T, d)
        emb = d.embed_tokens(nxt).to(g0.dtype)
        q, k, v = m.self_attn.qkv(torch.cat([m.input_layernorm(emb), m.hidden_norm(g0)], dim=-1), d.rotary(emb, pos))
        self.length[rows] = start + counts
        C = int(self.length[rows].max())
        n, t, b, p = scatter_index(rows, start, counts, T)
        self.kv.write(b, p, k[n, :, t], v[n, :, t], C)
        K, V = self.kv.read(None if all_rows(rows, len(self.length)) else rows, C)
        causal = torch.arange(C, device=pos.device)[None, None, :] <= pos[:, :, None]  # (N, T, C)
        out = attend(q, K, V, causal[:, None], scale=m.self_attn.scale)
        h = m.mlp_residual(m.attention_residual(g0, out.transpose(1, 2).reshape(N, T, -1)))
        return h[torch.arange(N, device=h.device), counts - 1], K, V

    @torch.inference_mode()
    def draft(self, rows: torch.Tensor, anchors: torch.Tensor, sampling: SamplingConfig, generator) -> Draft:
        """rows (N,), anchors (N,) -> a chain of g drafts per row."""
        d, m = self.d, self.d.midlayer
        h, K, V = self._step0(rows, anchors)  # (N, d)
        N, last = len(rows), self.length[rows] - 1  # the chain runs at each row's last position
        ctx_valid = torch.arange(K.shape[2], device=K.device) < self.length[rows, None]  # (N, C)
        ks, vs, tokens, probs, conf = [K], [V], [], [], []
        for k in range(self.g):
            logits = d.lm_head(d.norm(h))  # (N, V_draft)
            qk = sampling.probs(logits)
            tok = d.draft_to_target(sample(qk, generator))  # (N,) target ids
            tokens.append(tok)
            probs.append(qk)
            conf.append(top_probability(logits))
            if k == self.g - 1:
                break
            emb = d.embed_tokens(tok)[:, None].to(h.dtype)  # (N, 1, d)
            rope = d.rotary(emb, (last + k + 1)[:, None])
            q, kk, vv = m.self_attn.qkv(torch.cat([m.input_layernorm(emb), m.hidden_norm(h[:, None])], dim=-1), rope)
            ks.append(kk)
            vs.append(vv)
            mask = torch.cat([ctx_valid, ctx_valid.new_ones(N, k + 1)], dim=1)[:, None, None]  # (N, 1, 1, C+k+1)
            out = attend(q, torch.cat(ks, 2), torch.cat(vs, 2), mask, scale=m.self_attn.scale)
            h = m.mlp_residual(m.attention_residual(h[:, None], out.transpose(1, 2).reshape(N, 1, -1)))[:, 0]
        q = None if sampling.greedy else d.to_target_vocab(torch.stack(probs, 1))  # (N, g, V)
        return Draft(torch.stack(tokens, 1), q, torch.stack(conf, 1))
