"""What the decoding loop records and the scheduler reads, on rounds worked out by hand.

Each expected number below is computed in the comment beside it from the definitions, not by the code:
    calibration     a_{r,k} = prod_{i<=k} c_{r,i} against 1[m_r >= k]
    STS             c' = sigmoid(logit(c) / T_k); the scheduler reads calibrated survival (the config's temperatures,
                    else the drafter's saved ones; slots past the fitted ones reuse the last temperature)
    online estimate after a drafted round, slot k of a row is observed only when it was verified (k <= L) and every
                    earlier slot was accepted (k <= m + 1): hit if k <= m; unverified slots are neither credited
                    nor blamed
    tau             tokens emitted per round, nothing after EOS or past max_new_tokens counted
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from deepspec.config.decoding import ScheduleConfig
from deepspec.decoding.scheduler import VerifyScheduler
from deepspec.decoding.speculative import GenerationResult, _emit
from deepspec.evaluation import metrics


def test_calibration_reads_the_cumulative_product_against_prefix_survival():
    """Rounds (c_1, c_2) -> a = (c_1, c_1 c_2), labels 1[m >= 1], 1[m >= 2]:
    r0 (0.5, 0.5), m = 2 -> a = (0.5, 0.25), labels (1, 1)
    r1 (0.9, 0.4), m = 1 -> a = (0.9, 0.36), labels (1, 0)
    r2 (0.2, 1.0), m = 0 -> a = (0.2, 0.2),  labels (0, 0)
    position 2: mean predicted (0.25 + 0.36 + 0.2) / 3 = 0.27, observed 1/3,
    Brier ((0.75)^2 + 0.36^2 + 0.2^2) / 3; position 1: Brier (0.25 + 0.01 + 0.04) / 3 = 0.1."""
    conf = torch.tensor([[0.5, 0.5], [0.9, 0.4], [0.2, 1.0]])
    cal = metrics.calibration(conf, torch.tensor([2, 1, 0]))
    assert cal["mean_predicted"] == pytest.approx([(0.5 + 0.9 + 0.2) / 3, 0.27])
    assert cal["mean_observed"] == pytest.approx([2 / 3, 1 / 3])
    assert cal["brier"] == pytest.approx([0.1, (0.75 ** 2 + 0.36 ** 2 + 0.2 ** 2) / 3])
    # AUROC at position 2: positives {0.25}, negatives {0.36, 0.2}: 0.25 beats one of two -> 0.5
    assert cal["auroc"][1] == pytest.approx(0.5)


def test_the_scheduler_reads_sts_calibrated_survival():
    """c = 0.8 has logit ln 4; T = 2 gives sigmoid(ln 2) = 2/3, T = 0.5 gives sigmoid(ln 16) = 16/17.
    Temperatures (2, 0.5) on c = (0.8, 0.8, 0.8): c' = (2/3, 16/17, 16/17) (slot 3 reuses the last T),
    survival (2/3, 32/51, 512/867)."""
    rows, conf = torch.tensor([0]), torch.tensor([[0.8, 0.8, 0.8]])
    expected = [2 / 3, 2 / 3 * 16 / 17, 2 / 3 * (16 / 17) ** 2]
    got = VerifyScheduler(ScheduleConfig(policy="threshold", temperatures=[2.0, 0.5]), 3, None).survival(rows, conf)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)
    # the drafter's saved temperatures when the config names none; the config's win when it does
    drafter_temps = VerifyScheduler(ScheduleConfig(policy="threshold"), 3, None, temperatures=[2.0, 0.5])
    assert drafter_temps.survival(rows, conf)[0].tolist() == pytest.approx(expected, abs=1e-6)
    config_wins = VerifyScheduler(ScheduleConfig(policy="threshold", temperatures=[1.0]), 3, None, temperatures=[2.0, 0.5])
    assert config_wins.survival(rows, conf)[0].tolist() == pytest.approx([0.8, 0.64, 0.512], abs=1e-6)
    # threshold 0.63 verifies the leading slots at or above it: calibrated (0.667, 0.627, 0.591) -> 1; raw (0.8, 0.64, 0.512) -> 2
    assert VerifyScheduler(ScheduleConfig(policy="threshold", threshold=0.63), 3, None, [2.0, 0.5]).lengths(rows, conf, 0.0).tolist() == [1]
    assert VerifyScheduler(ScheduleConfig(policy="threshold", threshold=0.63), 3, None, None).lengths(rows, conf, 0.0).tolist() == [2]


def test_the_online_estimate_credits_only_verified_slots():
    """EMA 0.5 from 0.5 everywhere, block 3.
    row 0: L = 2, m = 2 (every verified draft accepted): slots 1, 2 observed and hit -> 0.75, 0.75; slot 3 was not
           verified -> stays 0.5.
    row 1: L = 3, m = 1: slot 1 hit -> 0.75, slot 2 observed and missed -> 0.25, slot 3 not reached -> 0.5.
    The prior over rows: slots 1 and 2 seen twice (weight 1 - (1 - 0.5/4)^2 = 0.234375), means 1 and 0.5:
    (0.234375 + 0.765625 * 0.5, 0.5, 0.5) = (0.6171875, 0.5, 0.5)."""
    s = VerifyScheduler(ScheduleConfig(policy="threshold", confidence="online", online_ema=0.5), 3, None)
    s.start(2)
    s.observe(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([2, 1]), 0.01)
    assert s.online.tolist() == [[0.75, 0.75, 0.5], [0.75, 0.25, 0.5]]
    assert s.prior.tolist() == pytest.approx([0.6171875, 0.5, 0.5])
    # the online policy's survival is the cumulative product of the estimate: row 1 (0.75, 0.1875, 0.09375)
    assert s.survival(torch.tensor([1]), torch.zeros(1, 3))[0].tolist() == pytest.approx([0.75, 0.1875, 0.09375])
    # a new generation starts from the prior
    s.start(1)
    assert s.online.tolist() == [pytest.approx([0.6171875, 0.5, 0.5])]


def test_tau_counts_nothing_after_eos_or_max_new_tokens():
    """Three rows, each with 1 token from the prefill, max_new_tokens 5, EOS = 2:
    row 0: a round emits [7, 8, 9] (m = 2): 3 tokens; then [4, 5, 6] (m = 2) but only 1 fits -> emitted (3, 1), stops.
    row 1: a round emits [7, 2, 9, 9] (m = 3): EOS second -> [7, 2], emitted 2, stops.
    row 2: a round emits [7] (m = 0): 1, then [8, 9] (m = 1): 2 -> 4 tokens, still running.
    tau per row: 2.0, 2.0, 1.5; over all rounds (3 + 1 + 2 + 1 + 2) / 5 = 1.8."""
    results = [GenerationResult([1]) for _ in range(3)]
    batch = SimpleNamespace(results=results, active=torch.ones(3, dtype=torch.bool), rows=torch.arange(3),
                            cache=DynamicCache(), mask=torch.ones(3, 5, dtype=torch.long), lengths=torch.tensor([3, 4, 5]))
    _emit(batch, [0, 1, 2], [[7, 8, 9], [7, 2, 9, 9], [7]], [2, 3, 0], [3, 3, 3], 5, 2)
    _emit(batch, [0, 2], [[4, 5, 6], [8, 9]], [2, 1], [3, 3], 5, 2)
    assert [r.tokens for r in results] == [[1, 7, 8, 9, 4], [1, 7, 2], [1, 7, 8, 9]]
    assert [r.emitted_per_round for r in results] == [[3, 1], [2], [1, 2]]
    assert [r.tau for r in results] == [2.0, 2.0, 1.5]
    assert batch.rows.tolist() == [2]  # rows 0 (max_new_tokens) and 1 (EOS) stopped
    assert batch.lengths.tolist() == [5] and len(batch.mask) == 1  # and left the target's batch
    emitted = [e for r in results for e in r.emitted_per_round]
    assert sum(emitted) / len(emitted) == pytest.approx(1.8)
    # acceptance_stats' own "tau" is mean(m + 1) over the drafts the target accepted (2.6 here, EOS or not): the
    # evaluation reports the emitted tau above in its place (harness.run_dataset)
    assert metrics.acceptance_stats([2, 3, 0, 2, 1], 3)["tau"] == pytest.approx((3 + 4 + 1 + 3 + 2) / 5)


def test_calibration_takes_only_rounds_whose_every_draft_was_verified():
    """A scheduler may draft and verify a prefix or nothing, and a plain round drafts nothing: calibration pairs each
    drafted round's confidences with its own accepted count, and keeps only rounds where every slot's fate was seen."""
    from deepspec.decoding.speculative import GenerationResult
    from deepspec.decoding.sessions.lookup import MODEL, PLAIN
    from deepspec.evaluation.harness import fully_verified_rounds

    c1, c2, c3, c4 = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9], [0.9, 0.9, 0.9]
    res = GenerationResult(tokens=[0], accepted_per_round=[0, 0, 2, 1, 3], verified_per_round=[0, 0, 3, 1, 3],
                           source_per_round=[PLAIN, PLAIN, MODEL, MODEL, MODEL],  # a round that verified nothing: PLAIN
                           confidences=[c1, c2, c3, c4], drafted_verified=[0, 3, 1, 3])  # round 1 plain, round 2 drafted L=0
    assert fully_verified_rounds(res) == ([c2, c4], [2, 3])
