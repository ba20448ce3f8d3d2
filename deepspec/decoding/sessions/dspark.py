"""DSpark at inference: one parallel backbone pass, then the Markov head walks the block left to right.

    h            = backbone(cached context, [anchor, MASK, ...])            (N, g, d)   one pass
    for k = 1..g:                                                           (walk over slots,
        z_k      = markov.step(W1[x_{k-1}], h_k, state)      x_0 = anchor     vectorised over rows)
        q_k      = probs(lm_head(h_k) + W2 z_k);  x_k ~ q_k
    c            = sigmoid(confidence_head([h; W1[x_{0..g-1}]]))          (N, g)      one pass

Only what depends on the previous token runs inside the walk. The vanilla head without top-k/top-p
takes the fused walk: greedy, ``kernels.markov_walk`` (gather, W2 product, argmax per slot); sampled,
``kernels.sample_walk``: on CUDA one Triton kernel per slot with Gumbel-max sampling, the block's
noise drawn at once and q computed for the whole block after the walk (the softmax the Gumbel-max
drew from); elsewhere sampling by inversion, one uniform per slot (a CPU pays more for V Gumbel
numbers per slot than for the walk).

Reduced draft vocabulary (N of V tokens): logits and sampling live in the draft vocabulary, the walk
feeds W1 the previous token's target id, and the Draft carries target ids and q over the full
vocabulary (zeros outside the draft ids), so verification is unchanged.
"""
from __future__ import annotations

import torch

from deepspec.decoding import kernels
from deepspec.decoding.sessions.draft import BlockBackboneSession, Draft, top_probability
from deepspec.decoding.verify import SamplingConfig, sample


class DSparkSession(BlockBackboneSession):
    @torch.inference_mode()
    def draft(self, rows: torch.Tensor, anchors: torch.Tensor, sampling: SamplingConfig, generator) -> Draft:
        """rows (N,), anchors (N,) -> a block of g drafts per row, with confidences."""
        d, markov = self.d, self.d.markov_head
        h = self.block_hidden(rows, anchors)  # (N, g, d)
        base = d.lm_head(h)  # (N, g, V_draft)
        if markov is None:  # rank 0: no sequential head, every slot from the parallel pass
            logits = base.float()
            q = sampling.probs(logits)
            tokens = d.draft_to_target(sample(q, generator))
        elif markov.kind == "vanilla" and not sampling.top_k and sampling.top_p >= 1.0:
            tokens, logits, q = self._fused_walk(base, anchors, sampling, generator)
        else:
            tokens, logits, q = self._walk(h, base, anchors, sampling, generator)
        prev = torch.cat([anchors[:, None], tokens[:, :-1]], dim=1)  # x_{k-1} per slot (N, g)
        conf = d.confidence_logits(h, prev)
        conf = top_probability(logits) if conf is None else torch.sigmoid(conf.float())
        return Draft(tokens, None if sampling.greedy else d.to_target_vocab(q), conf)

    def _fused_walk(self, base, anchors, sampling, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Vanilla head: x_k ~ softmax((U_k + W2 W1[x_{k-1}]) / T) (greedy: the argmax) -> tokens (N, g) target ids,
        logits (N, g, V_draft) fp32 and q (N, g, V_draft) (None when greedy: verification reads no q)."""
        w1, w2 = self.d.markov_head.markov_w1.weight, self.d.markov_head.markov_w2.weight
        if sampling.greedy:
            tokens, logits = kernels.markov_walk(base, w1, w2, anchors, 0.0, None, self.d.d2t)
            return tokens, logits, None
        tokens, logits, q = kernels.sample_walk(base, w1, w2, anchors, sampling.temperature, generator, self.d.d2t)
        return tokens, logits, sampling.probs(logits) if q is None else q

    def _walk(self, h, base, anchors, sampling, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Any head, any sampling: z_k from the head's step, q_k = probs(U_k + W2 z_k), x_k ~ q_k (a target id)."""
        markov = self.d.markov_head
        prev, state, tokens, logits, probs = anchors, None, [], [], []
        for k in range(self.g):
            z, state = markov.step(markov.embed_prev(prev), h[:, k], state)
            lk = base[:, k].float() + markov.markov_w2(z).float()  # (N, V_draft)
            qk = sampling.probs(lk)
            prev = self.d.draft_to_target(sample(qk, generator))
            tokens.append(prev)
            logits.append(lk)
            probs.append(qk)
        return torch.stack(tokens, 1), torch.stack(logits, 1), torch.stack(probs, 1)
