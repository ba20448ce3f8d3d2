"""Algorithm 1 on hand-made confidence tables, and decoding under it stays lossless."""
from __future__ import annotations

import torch

from deepspec.decoding.scheduler import prefix_schedule
from deepspec.evaluation.scheduler import simulate_serving


def test_free_verification_admits_everything():
    conf = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.2]])
    assert prefix_schedule(conf, lambda b: 100.0) == [3, 3]


def test_linear_cost_admits_only_tokens_worth_their_step():
    # SPS(B) = 1/B: admitting (r, j) raises Theta = tau*/B iff a_{r,j} > tau*/B.
    conf = torch.tensor([[0.95, 0.9, 0.5], [0.9, 0.3, 0.9]])
    # a: r0 = .95, .855, .4275 ; r1 = .9, .27, .243. Start B=2, tau=2 (Theta 1.0).
    # + r0j0 (.95): 2.95/3 = .983 < 1.0 -> stop at once.
    assert prefix_schedule(conf, lambda b: 1.0 / b) == [0, 0]
    # Sub-linear cost: SPS(B) = 1/(1 + 0.1 B). Theta(B=2)=2/1.2=1.667; +.95: 2.95/1.3=2.269; +.9: 3.85/1.4=2.75;
    # +.855: 4.705/1.5=3.137; +.4275: 5.1325/1.6=3.208; +.27: 5.4025/1.7=3.178 <= 3.208 -> stop.
    assert prefix_schedule(conf, lambda b: 1.0 / (1 + 0.1 * b)) == [3, 1]


def test_admissions_follow_prefix_order_within_a_request():
    conf = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # ties everywhere: slots must still go 1, 2, 3, 4
    assert prefix_schedule(conf, lambda b: 1.0 / (1 + 0.01 * b)) == [4]


def test_simulation_confidence_scheduling_beats_fixed_length_under_load():
    g = 6
    gen = torch.Generator().manual_seed(0)
    rounds = []
    for _ in range(200):
        c = (torch.rand(g, generator=gen) * 0.7 + 0.25).tolist()
        m = int(torch.bernoulli(torch.tensor(c), generator=gen).cumprod(0).sum())
        rounds.append((c, m))
    sps = [1.0 / (1 + 0.05 * b) for b in range(1, 400)]  # verification cost grows with the batch
    res = simulate_serving(rounds, sps, loads=[1, 16], g=g, steps=50)
    low, high = res["loads"]
    assert high["confidence"]["throughput_tokens_per_s"] > high["fixed"]["throughput_tokens_per_s"]
    assert high["fixed"]["per_request_tokens_per_s"] < low["fixed"]["per_request_tokens_per_s"]
