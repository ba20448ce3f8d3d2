"""The sampling transform's law written out from its definition, independently of ``SamplingConfig.probs``.

``reference_probs`` is that definition, one row at a time in plain Python (no torch): divide the logits by the
temperature; top-k keeps every token whose scaled logit is at least the k-th largest (ties with the k-th stay, so
more than k tokens may survive); softmax over the survivors; top-p walks the tokens by probability, highest first
(ties: the lower token id first), keeping each token while the mass already kept is below top_p, so the token that
crosses top_p is kept and a token reached when the kept mass equals top_p exactly is not; then renormalise.
Temperature 0 is the first maximum's one-hot.

Used by ``test_sampling_law.py`` (against the code, by hand and on generated rows) and ``test_exact_law.py`` (the
enumerated law every generation path is held to). See ``test_sampling_law.py`` for HF's tie conventions.
"""
from __future__ import annotations

import math


def reference_probs(logits: list[float], temperature: float, top_k: int = 0, top_p: float = 1.0) -> list[float]:
    """One row of V logits -> V probabilities, from the definitions in the module docstring."""
    V = len(logits)
    if temperature == 0:
        best = 0
        for i in range(V):
            if logits[i] > logits[best]:
                best = i
        return [1.0 if i == best else 0.0 for i in range(V)]
    z = [x / temperature for x in logits]
    alive = [True] * V
    if 0 < top_k < V:
        kth = sorted(z, reverse=True)[top_k - 1]
        alive = [zi >= kth for zi in z]
    top = max(z[i] for i in range(V) if alive[i])
    w = [math.exp(z[i] - top) if alive[i] else 0.0 for i in range(V)]
    p = [wi / sum(w) for wi in w]
    if top_p < 1.0:
        kept, mass = [], 0.0
        for i in sorted(range(V), key=lambda i: (-p[i], i)):
            if mass >= top_p:
                break
            kept.append(i)
            mass += p[i]
        p = [p[i] / mass if i in kept else 0.0 for i in range(V)]
    return p
