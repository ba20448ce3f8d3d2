"""Acceptance and calibration metrics on hand-made inputs with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from deepspec.evaluation import metrics


def test_acceptance_stats_by_hand():
    s = metrics.acceptance_stats([0, 2, 4, 4], g=4)
    assert s["tau"] == (1 + 3 + 5 + 5) / 4
    assert s["prefix_survival"] == [0.75, 0.75, 0.5, 0.5]
    assert s["conditional_acceptance"] == pytest.approx([0.75, 1.0, 2 / 3, 1.0])
    assert s["accept_length_histogram"] == {"1": 1, "2": 0, "3": 1, "4": 0, "5": 2}


def test_auroc_and_ece_extremes():
    label = torch.tensor([0, 0, 1, 1])
    assert metrics.auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), label) == 1.0
    assert metrics.auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), label) == 0.0
    assert metrics.auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), label) == 0.5
    assert math.isnan(metrics.auroc(torch.tensor([0.3, 0.4]), torch.tensor([1, 1])))
    # predictions equal to the empirical frequency in every bin: zero calibration error
    pred = torch.tensor([0.25] * 4 + [0.75] * 4)
    lab = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    assert metrics.ece(pred, lab) < 1e-12
    assert metrics.ece(torch.full((4,), 0.9), torch.tensor([1, 0, 0, 0])) == pytest.approx(0.65)
    assert metrics.ece(torch.full((4,), 0.1), torch.tensor([1, 1, 1, 0])) == pytest.approx(0.65)  # under-confidence counts too


def test_sequential_temperature_scaling_repairs_overconfidence():
    g, R = 4, 4000
    gen = torch.Generator().manual_seed(0)
    true_c = torch.rand(R, g, generator=gen) * 0.6 + 0.3  # true conditional acceptance per slot
    survive = torch.bernoulli(true_c, generator=gen).cumprod(1)
    accepted = survive.sum(1)  # m = accepted prefix length
    overconfident = torch.sigmoid(torch.logit(true_c) * 3)  # too sharp
    temps = metrics.fit_sequential_temperatures(overconfident, accepted)
    before = metrics.calibration(overconfident, accepted)
    after = metrics.calibration(metrics.apply_temperatures(overconfident, temps), accepted)
    assert all(t > 1.5 for t in temps), temps  # it softens, as the truth is 3x less sharp
    assert all(a < b for a, b in zip(after["ece"], before["ece"]))
    assert after["ece"][0] < 0.03
    assert all(0.5 < x <= 1 for x in before["auroc"])  # the ranking carries signal; scaling keeps ranking
    assert after["auroc"][0] == before["auroc"][0]


def test_threshold_sweep_cumulative_and_per_step_differ_as_defined():
    conf = torch.tensor([[0.9, 0.8, 0.9]])  # cumulative 0.9, 0.72, 0.648
    accepted = torch.tensor([3])
    cum = {r["threshold"]: r["verified_per_round"] for r in metrics.threshold_sweep(conf, accepted, [0.7, 0.85])}
    per = {r["threshold"]: r["verified_per_round"] for r in metrics.threshold_sweep(conf, accepted, [0.7, 0.85], per_step=True)}
    assert cum == {0.7: 2.0, 0.85: 1.0}
    assert per == {0.7: 3.0, 0.85: 1.0}


def test_sts_fits_sequentially_each_position_given_the_earlier_ones_scaled():
    """Position 1 overconfident, position 2 already calibrated *given* position 1: only a sequential fit
    leaves T_2 at 1 (an independent fit would bend T_2 to absorb position 1's error)."""
    R = 20000
    gen = torch.Generator().manual_seed(0)
    c1 = torch.rand(R, generator=gen) * 0.4 + 0.3
    c2 = torch.rand(R, generator=gen) * 0.45 + 0.5
    survive = torch.bernoulli(torch.stack([c1, c2], 1), generator=gen).cumprod(1)
    conf = torch.stack([torch.sigmoid(torch.logit(c1) * 3), c2], 1)  # slot 1 too sharp, slot 2 exact
    temps = metrics.fit_sequential_temperatures(conf, survive.sum(1))
    assert temps[0] > 2.0
    assert abs(math.log(temps[1])) < 0.16, temps  # within ~3 grid steps of 1
