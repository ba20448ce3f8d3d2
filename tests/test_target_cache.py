"""A hybrid target's recurrent layers after any accept/reject history hold plain decoding's states.

The real batched loop runs on tiny Qwen3.5 / Qwen3-Next targets (a gated delta-net layer, then attention) with
random drafters, so rows accept different amounts every round, finish at different times and take plain rounds.
After every round, each row's recurrent state (H, dk, dv) and conv state (C, K) in every linear-attention layer
must equal those of plain one-token-at-a-time decoding of the same tokens from that row's prompt alone (no padding,
no batch), to fp32 tolerance.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_exact_law import V, cost_model, drafter, tiny_target
from deepspec.config.decoding import ScheduleConfig
from deepspec.decoding import speculative
from deepspec.decoding.scheduler import VerifyScheduler
from deepspec.decoding.sessions import make_session
from deepspec.decoding.target_cache import TargetCache, rollback_problem
from deepspec.decoding.verify import SamplingConfig

ATOL = 1e-5


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_next"])
def hybrid(request, tmp_path_factory):
    # weights at 0.2 keep state entries O(1): an absolute tolerance then means what it says (at 0.5 they reach ~3, and
    # the batched, left-padded prefill's rounding alone moves them by 2e-5)
    return tiny_target(tmp_path_factory.mktemp(f"state_{request.param}"), request.param, initializer_range=0.2)


def linear_states(cache: TargetCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(recurrent (B, H, dk, dv), conv (B, C, K)) of every linear-attention layer, copied."""
    return [(cache.layers[i].recurrent_states[0].clone(), cache.layers[i].conv_states[0].clone()) for i in cache.recurrent]


class RecordingCache(TargetCache):
    """The engine's cache, keeping a copy of the linear states and of ``kept`` after every rollback, with the ids of
    the rows it held then (finished rows leave the engine's batch: ``reorder_cache``)."""

    instances: list["RecordingCache"] = []

    def __init__(self, config):
        super().__init__(config)
        self.after_rounds: list[tuple[list[int], torch.Tensor, list]] = []
        self.held: list[int] | None = None
        RecordingCache.instances.append(self)

    def keep_prefix(self, kept):
        super().keep_prefix(kept)
        self.after_rounds.append((self.rows_held(), kept.clone(), linear_states(self)))

    def reorder_cache(self, rows):
        self.held = [self.rows_held()[i] for i in rows.tolist()]
        super().reorder_cache(rows)

    def rows_held(self) -> list[int]:
        if self.held is None:  # the whole batch, from the prefill's states
            self.held = list(range(len(self.layers[self.recurrent[0]].recurrent_states[0])))
        return list(self.held)


@torch.no_grad()
def plain_states(target, prompt: torch.Tensor, tokens: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """states[n]: the linear states after the prompt and the first n ``tokens``, fed one at a time (plain decoding)."""
    cache = TargetCache(target.config)
    P = len(prompt)
    target.decoder_with_positions(prompt[None], torch.ones(1, P, dtype=torch.long), torch.arange(P)[None], cache)
    states = [linear_states(cache)]
    for n, tok in enumerate(tokens):
        mask = torch.ones(1, P + n + 1, dtype=torch.long)
        target.decoder_with_positions(torch.tensor([[tok]]), mask, torch.tensor([[P + n]]), cache)
        states.append(linear_states(cache))
    return states


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["vanilla", "dflash", "eagle3"]), block=st.integers(1, 4),
       lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4), max_new=st.integers(2, 12),
       policy=st.sampled_from(["fixed", "scheduled_with_draft_cost"]), temperature=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 1000))
def test_each_rows_recurrent_and_conv_states_equal_plain_decodings(hybrid, monkeypatch, kind, block, lengths, max_new, policy,
                                                                    temperature, seed):
    target = hybrid[0]
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    RecordingCache.instances = []
    monkeypatch.setattr(speculative, "TargetCache", RecordingCache)
    sched = VerifyScheduler(ScheduleConfig(policy=policy), block, cost_model(block) if policy != "fixed" else None)
    results = speculative.speculative_generate_batch(target, make_session(drafter(kind, hybrid, block), len(prompts)), prompts,
                                                     max_new, SamplingConfig(temperature), None, g, sched)
    (cache,) = RecordingCache.instances
    for r, (prompt, res) in enumerate(zip(prompts, results)):
        plain = plain_states(target, prompt, res.tokens)
        # the rounds row r took part in, with its place in the batch then
        rounds = [(held.index(r), states) for held, kept, states in cache.after_rounds if r in held and int(kept[held.index(r)]) > 0]
        assert len(rounds) == len(res.emitted_per_round)
        fed = 0
        for i, ((at, states), emitted, accepted) in enumerate(zip(rounds, res.emitted_per_round, res.accepted_per_round)):
            if emitted < accepted + 1:  # the last round, cut at max_new_tokens: it fed drafts the row never emitted
                assert i == len(rounds) - 1
                break
            fed += emitted  # the anchor and the accepted drafts went through the target this round
            for (rec, conv), (rec_plain, conv_plain) in zip(states, plain[fed]):
                torch.testing.assert_close(rec[at], rec_plain[0], rtol=0, atol=ATOL)
                torch.testing.assert_close(conv[at], conv_plain[0], rtol=0, atol=ATOL)


def test_targets_the_engine_cannot_roll_back_are_refused_by_name():
    """A layer type that is neither attention nor linear attention is named; so is a linear-attention family whose
    rollback no test covers. Qwen3.5 (dense, MoE) and Qwen3-Next pass."""
    from transformers import Lfm2Config, OlmoHybridConfig, Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

    for ok in (Qwen3_5TextConfig, Qwen3_5MoeTextConfig, Qwen3NextConfig):
        assert rollback_problem(ok(num_hidden_layers=4)) is None
    assert "['conv']" in rollback_problem(Lfm2Config(num_hidden_layers=4, full_attn_idxs=[3]))
    assert "olmo_hybrid: its linear-attention layers' rollback is not tested" in rollback_problem(OlmoHybridConfig(num_hidden_layers=4))
