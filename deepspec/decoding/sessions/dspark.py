"""DSpark at inference: one parallel backbone pass, then the Markov head walks the block left to right.

    h            = backbone(cached context, [anchor, MASK, ...])            (N, g, d)   one pass
    for k = 1..g:                                                           (walk over slots,
        z_k      = markov.step(W1[x_{k-1}], h_k, state)      x_0 = anchor     vectorised over rows)
        q_k      = probs(lm_head(h_k) + W2 z_k);  x_k ~ q_k
        c_k      = sigmoid(confidence_head([h_k; W1[x_{k-1}]]))

The vanilla head without top-k/top-p takes the fused step (``kernels.markov_step``: gather, W2
product and Gumbel-max sampling in one Triton kernel on CUDA; the PyTorch reference elsewhere).
"""
from __future__ import annotations

import torch

from deepspec.decoding import kernels
from deepspec.decoding.sessions.draft import BlockBackboneSession, Draft, token_probability
from deepspec.decoding.verify import SamplingConfig, sample, uniform


class DSparkSession(BlockBackboneSession):
    @torch.no_grad()
    def draft(self, rows: torch.Tensor, anchors: torch.Tensor, sampling: SamplingConfig, generator) -> Draft:
        """rows (N,), anchors (N,) -> a block of g drafts per row, with confidences."""
        d = self.d
        h = self.block_hidden(rows, anchors)  # (N, g, d)
        base = d.lm_head(h)  # (N, g, V)
        markov, conf_head = d.markov_head, d.confidence_head
        fused = markov is not None and markov.kind == "vanilla" and not sampling.top_k and sampling.top_p >= 1.0
        prev, state, tokens, probs, conf = anchors, None, [], [], []
        for k in range(self.g):
            e = markov.embed_prev(prev) if markov is not None else None  # (N, r) W1[x_{k-1}]
            if fused:
                u = None if sampling.greedy else uniform(base[:, k].shape, generator, base.device)
                prev, logits = kernels.markov_step(base[:, k], markov.markov_w1.weight, markov.markov_w2.weight, prev,
                                                   sampling.temperature, u)  # (N,), (N, V)
                qk = sampling.probs(logits)
            else:
                logits = base[:, k]
                if markov is not None:
                    z, state = markov.step(e, h[:, k], state)
                    logits = logits + markov.markov_w2(z)
                qk = sampling.probs(logits)  # (N, V)
                prev = sample(qk, generator)
            tokens.append(prev)
            probs.append(qk)
            if conf_head is not None:
                with_markov = e is not None and d.cfg.confidence_head_with_markov
                conf.append(torch.sigmoid(conf_head(h[:, k : k + 1], e[:, None] if with_markov else None))[:, 0].float())
            else:
                conf.append(token_probability(logits, prev))  # no head: the drafter's own probability
        return Draft(torch.stack(tokens, 1), None if sampling.greedy else torch.stack(probs, 1), torch.stack(conf, 1))
