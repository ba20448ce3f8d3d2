"""The sampling transform (temperature, top-k, top-p) against a definition written independently of the code.

``reference_probs`` (``tests/sampling_reference.py``) is that definition, in plain Python, one row at a time; the
hand-computed cases below say in numbers what it says in words.

HF transformers' warpers (read in transformers 5.25, ``generation/logits_process.py``) agree except at one tie:
``TopKLogitsWarper`` drops ``scores < topk(scores, k)[-1]`` (ties with the k-th kept, like here);
``TopPLogitsWarper`` sorts ascending and drops while the ascending cumulative mass is <= 1 - top_p, which is the
same rule (drop a token once the mass above it reaches top_p) with the same order temperature -> top-k ->
renormalise -> top-p; but it sorts ascending, so among tokens tied at the top-p edge it keeps the higher ids
where this project keeps the lower ones. Either is a valid law; what matters is that the target side (plain
decoding, verification) and the draft side compute the same one, and that it is one fixed law: the project's sort
is stable for that reason (torch's default sort is not: at V >= 17 on a CPU it orders tied values arbitrarily).

``tests/test_exact_law.py`` takes its enumerated law from ``reference_probs``, so the engine and plain decoding
are held to this definition, not to ``SamplingConfig.probs`` itself.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from deepspec.decoding.speculative import autoregressive_generate_batch
from deepspec.decoding.verify import SamplingConfig
from sampling_reference import reference_probs
from test_exact_law import NEW, P_MIN, PROMPTS, V, chi2_pvalue, exact_law, tiny  # noqa: F401  (fixture re-used)


def probs(logits: list[float], **kw) -> list[float]:
    return SamplingConfig(**kw).probs(torch.tensor(logits)).tolist()


E = math.e
HAND = [  # (logits, sampling, expected probabilities worked out by hand)
    # temperature divides: T = 2 halves the logits -> e^1 : e^0 : e^-1 (multiplying would give e^4 : 1 : e^-4)
    ([2.0, 0.0, -2.0], dict(temperature=2.0), [E / (E + 1 + 1 / E), 1 / (E + 1 + 1 / E), (1 / E) / (E + 1 + 1 / E)]),
    ([1.0, 0.0], dict(temperature=0.5), [E ** 2 / (E ** 2 + 1), 1 / (E ** 2 + 1)]),
    # top-k = 2 without ties: exactly two tokens
    ([3.0, 2.0, 1.0, 0.0], dict(temperature=1.0, top_k=2), [E / (E + 1), 1 / (E + 1), 0.0, 0.0]),
    # top-k = 2 with a tie at the k-th: both tied tokens stay (three survive), e^2 : 1 : 1
    ([3.0, 1.0, 1.0, 0.0], dict(temperature=1.0, top_k=2), [E ** 2 / (E ** 2 + 2), 1 / (E ** 2 + 2), 1 / (E ** 2 + 2), 0.0]),
    # top-k = 1 with a tie at the top: both stay
    ([0.0, 2.0, 2.0], dict(temperature=1.0, top_k=1), [0.0, 0.5, 0.5]),
    # top-p = 0.6 on (0.5, 0.3, 0.2): 0.3 crosses 0.6 and is kept, 0.2 is dropped -> 0.5/0.8, 0.3/0.8
    ([math.log(0.5), math.log(0.3), math.log(0.2)], dict(temperature=1.0, top_p=0.6), [0.625, 0.375, 0.0]),
    # top-p = 0.45 on (0.5, 0.3, 0.2): the first token alone crosses it
    ([math.log(0.3), math.log(0.5), math.log(0.2)], dict(temperature=1.0, top_p=0.45), [0.0, 1.0, 0.0]),
    # top-p = 0.5 on four equal tokens (exact in binary): masses before them 0, .25, .5, .75 -> the first two stay
    ([0.0, 0.0, 0.0, 0.0], dict(temperature=1.0, top_p=0.5), [0.5, 0.5, 0.0, 0.0]),
    # tie at the top-p edge: (0.4, 0.3, 0.3), top_p = 0.5: 0.4 and one 0.3 stay, the lower id -> 4/7, 3/7, 0
    ([math.log(0.3), math.log(0.4), math.log(0.3)], dict(temperature=1.0, top_p=0.5), [3 / 7, 4 / 7, 0.0]),
    # top-k first, then top-p on the renormalised survivors: top-k 2 of (4, 4, 1, 1, 1, 1) logs leaves 0.5 / 0.5,
    # and top-p 0.5 keeps one of them; top-p on the full softmax (1/3 before the second 1/3) would keep both
    ([math.log(4), math.log(4), 0.0, 0.0, 0.0, 0.0], dict(temperature=1.0, top_k=2, top_p=0.5), [1.0, 0, 0, 0, 0, 0]),
    # greedy: the first maximum
    ([1.0, 3.0, 3.0, 0.0], dict(temperature=0.0), [0.0, 1.0, 0.0, 0.0]),
    ([1.0, 3.0, 3.0, 0.0], dict(temperature=0.0, top_k=1, top_p=0.1), [0.0, 1.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("logits,kw,expected", HAND, ids=[f"{i}-{kw}" for i, (_, kw, _) in enumerate(HAND)])
def test_hand_computed_cases(logits, kw, expected):
    assert reference_probs(logits, **kw) == pytest.approx(expected, abs=1e-12)  # the definition says what the hand did
    assert probs(logits, **kw) == pytest.approx(expected, abs=1e-6)


def test_ties_at_the_top_p_edge_keep_the_lower_ids_at_every_vocabulary_size():
    """24 equal tokens (and 24 below them), top_p = 0.25 of the mass: the kept tokens are the lowest ids, whatever
    the vocabulary size and the batch (an unstable sort kept arbitrary ones from V = 17 on)."""
    for V in (8, 17, 48, 1000):
        logits = torch.full((V,), -1.0)
        logits[: V // 2] = 2.0
        expected = torch.tensor(reference_probs(logits.tolist(), 1.0, top_p=0.25))
        for batch in (logits[None], logits.expand(3, 5, V)):
            got = SamplingConfig(1.0, top_p=0.25).probs(batch).reshape(-1, V)
            assert torch.allclose(got, expected.expand_as(got), atol=1e-6), V


def _cases(n: int, seed: int = 0):
    """Logits on a grid of halves (ties are exact, distinct values far apart), every combination of transforms."""
    rng = random.Random(seed)
    for _ in range(n):
        V = rng.randint(2, 24)
        logits = [rng.randint(-6, 6) / 2 for _ in range(V)]
        kw = dict(temperature=rng.choice([0.0, 0.5, 0.7, 1.0, 1.3, 2.0]), top_k=rng.choice([0, 1, 2, 3, V, V + 2]),
                  top_p=rng.choice([1.0, 0.2, 0.5, 0.75, 0.9, 0.99]))
        yield logits, kw


def _near_the_top_p_edge(logits, kw) -> bool:
    """A mass before some token within float32 rounding of top_p: fp32 and fp64 may decide that token differently."""
    if kw["top_p"] >= 1.0 or kw["temperature"] == 0:
        return False
    p = reference_probs(logits, kw["temperature"], kw["top_k"])
    mass = 0.0
    for q in sorted(p, reverse=True):
        if abs(mass - kw["top_p"]) < 1e-5:
            return True
        mass += q
    return False


def test_the_transform_equals_the_definition_on_generated_rows():
    checked = 0
    for logits, kw in _cases(600):
        if _near_the_top_p_edge(logits, kw):
            continue
        assert probs(logits, **kw) == pytest.approx(reference_probs(logits, **kw), abs=1e-6), (logits, kw)
        checked += 1
    assert checked > 500


def test_plain_sampled_decoding_follows_the_independent_law(tiny):
    """Plain decoding (the reference the engine is compared with) draws whole generations from the law enumerated
    with ``reference_probs`` (``test_exact_law`` holds the speculative engine to the same law)."""
    target, n = tiny[0], 2000
    for sampling in (SamplingConfig(0.7, top_k=4, top_p=0.9), SamplingConfig(1.3, top_k=2)):
        prompts = [PROMPTS[i % 2] for i in range(2 * n)]
        res = autoregressive_generate_batch(target, prompts, NEW, sampling, None, torch.Generator().manual_seed(0))
        for i, prompt in enumerate(PROMPTS):
            p = chi2_pvalue([r.tokens for r in res[i::2]], exact_law(target, prompt, sampling))
            assert p > P_MIN, (sampling, p)

