"""A replay of recorded rounds under Algorithm 1 (the runtime scheduler is ``deepspec.decoding.scheduler``).

Each active request r has drafted g tokens with confidences c_{r,1..g}; a_{r,j} = prod_{i<=j} c_{r,i}
is the predicted probability that its first j drafts all survive. Verifying costs one target step
whose speed SPS(B) (steps/s) falls as the verified batch B grows. Algorithm 1:

    B = R, tau* = R                        (every request verifies its anchor: one token each)
    for (r, j) in order of a_{r,j}, highest first:
        Theta' = (tau* + a_{r,j}) * SPS(B + 1)
        if Theta' <= tau* * SPS(B): stop   (the first admission that does not raise throughput)
        admit: B += 1, tau* += a_{r,j}, request r verifies j drafts
    
Because a_{r,j} never increases with j, admissions within a request come in prefix order.
Verifying only a prefix of the drafts is still exact speculative sampling (the bonus token is
drawn at the last verified position), so the schedule changes speed, never the output.
"""
from __future__ import annotations

from typing import Sequence

import torch

from deepspec.decoding.scheduler import prefix_schedule


def simulate_serving(rounds: Sequence[tuple[list[float], int]], sps_table: list[float], loads: Sequence[int],
                     g: int, steps: int = 200, seed: int = 0) -> dict:
    """Replay recorded rounds (confidences, accepted m) for R concurrent requests.

    Per step every request draws a recorded round; fixed-length verification verifies all g drafts,
    confidence scheduling verifies ``prefix_schedule``'s prefix. Tokens per request per step =
    min(m, L) + 1. Step time = 1 / SPS(sum of verified tokens). Reports throughput (tokens/s over all
    requests) and per-request tokens/s for both policies at each load R.
    """
    gen = torch.Generator().manual_seed(seed)
    sps = lambda b: sps_table[min(b, len(sps_table)) - 1] * (len(sps_table) / b if b > len(sps_table) else 1.0)
    out = []
    for R in loads:
        picks = torch.randint(len(rounds), (steps, R), generator=gen)
        res = {}
        for policy in ("fixed", "confidence"):
            tokens, seconds = 0, 0.0
            for s in range(steps):
                batch = [rounds[int(i)] for i in picks[s]]
                if policy == "fixed":
                    lengths = [g] * R
                else:
                    lengths = prefix_schedule(torch.tensor([c for c, _ in batch]), sps)
                tokens += sum(min(m, L) + 1 for (_, m), L in zip(batch, lengths))
                seconds += 1.0 / sps(sum(L + 1 for L in lengths))
            res[policy] = {"throughput_tokens_per_s": tokens / seconds, "per_request_tokens_per_s": tokens / seconds / R,
                           "tokens_per_step": tokens / steps}
        out.append({"concurrent_requests": R, **res})
    return {"block_size": g, "steps": steps, "loads": out}
