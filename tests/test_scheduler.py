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


# ----------------------------------------------------------------------------- the runtime scheduler
import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

from deepspec.config.decoding import ScheduleConfig  # noqa: E402
from deepspec.decoding.scheduler import DraftGate, VerifyCostModel, VerifyScheduler, choose_lengths  # noqa: E402


def test_column_algorithm_stops_at_the_first_column_that_lowers_throughput():
    # R=2; verify cost 1 + 0.5 (W-1). Columns add 1.7, 0.4, 1.9 (cumulative survival cannot rise in a real
    # row; here the third column is built to reward a global search, which Algorithm 1 must not do).
    a = torch.tensor([[0.9, 0.2, 0.2], [0.8, 0.2, 0.2]], dtype=torch.float64)
    cost = lambda W: 1 + 0.5 * (W - 1)  # noqa: E731
    # Theta: W=1: 2/1 = 2; W=2: 3.7/1.5 = 2.47 (admit); W=3: 4.1/2 = 2.05 (lower: stop)
    assert choose_lengths(a, cost).tolist() == [1, 1]
    a_global = a.clone()
    a_global[:, 2] = 5.0  # a later column worth a lot: a global search would take W=4
    assert choose_lengths(a_global, cost).tolist() == [1, 1]


def test_draft_cost_widens_the_verified_prefix_and_zero_survival_is_never_verified():
    a = torch.tensor([[0.6, 0.3, 0.0]], dtype=torch.float64)
    cost = lambda W: 1 + 0.5 * (W - 1)  # noqa: E731
    assert choose_lengths(a, cost).tolist() == [1]  # 1.6/1.5 > 1; 1.9/2 < 1.067
    assert choose_lengths(a, cost, draft_seconds=3.0).tolist() == [2]  # a sunk draft makes columns cheap
    free = lambda W: 1.0  # noqa: E731
    assert choose_lengths(a, free).tolist() == [2]  # survival 0: never admitted, even when free


def time_plain(gate: DraftGate, R: int, seconds: float, cost: VerifyCostModel) -> None:
    """The plain steps a gate times at a load before it may draft there."""
    for _ in range(DraftGate.plain_samples):
        gate.observe_round(R, False, 1, R, seconds, cost)


def gains(survival: torch.Tensor) -> tuple[int, list[float]]:
    """(R, g) observed survival -> what the gate takes: R and the column sums."""
    return survival.shape[0], survival.sum(0).tolist()


def test_gate_decodes_plainly_when_drafting_cannot_pay_and_probes_within_its_budget():
    cost = VerifyCostModel([1, 8], [1, 2, 3], [[1.0, 1.1, 1.2], [8.0, 16.0, 24.0]], {})
    gate = DraftGate(budget=0.1)
    high = torch.ones(1, 2, dtype=torch.float64)
    assert not gate.should_draft(*gains(high), cost)  # a plain step never timed at this load: time one first
    time_plain(gate, 1, 1.0, cost)
    assert gate.should_draft(*gains(high), cost) and gate.probing  # no draft measured yet: a probe to learn its cost
    gate.observe_round(1, True, 3, 1, 1.3, cost, steady=False)  # its catch-up round teaches no cost
    assert gate.should_draft(*gains(high), cost, steady=True) and gate.probing  # the steady round that times it here
    gate.observe_draft(1, 0.1)
    gate.observe_round(1, True, 3, 3, 1.3, cost, steady=True)
    assert gate.should_draft(*gains(high), cost) and not gate.probing  # 3 tokens / 1.3 s beats 1 / 1 s
    low = torch.full((1, 2), 0.01, dtype=torch.float64)
    rounds, probe_seconds, plain_seconds = 0, 0.0, 0.0
    for _ in range(200):  # plain wins; each probe takes 2.3 s for 1 token where a plain step takes 1 s
        if gate.should_draft(*gains(low), cost):
            assert gate.probing
            gate.observe_round(1, True, 3, 1, 2.3, cost)
            probe_seconds += 2.3 - 1.0
        else:
            gate.observe_round(1, False, 1, 1, 1.0, cost)
            plain_seconds += 1.0
        rounds += 1
    assert 10 <= probe_seconds / 1.3 <= 20  # probes happen, about one per 1.3 / 0.1 = 13 plain steps
    assert probe_seconds <= 0.1 * plain_seconds + 1.3  # and cost no more than the budget (plus the first)
    gate.observe_draft(8, 0.1)
    time_plain(gate, 8, 8.0, cost)
    compute_bound = torch.ones(8, 2, dtype=torch.float64)  # at 8 rows verifying costs W x a step: no width pays
    assert not any(gate.should_draft(*gains(compute_bound), cost) for _ in range(20))


def test_the_scheduler_gate_sees_what_drafted_rounds_observed_after_a_run_of_plain_rounds():
    """Between drafted rounds the gate reuses its survival sums; a drafted round's outcome must reach the next decision."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    sched = VerifyScheduler(ScheduleConfig(policy="scheduled_with_draft_cost", plain_streak=1), 2, cost, [1.0, 1.0])
    rows = torch.tensor([0])
    sched.gate.observe_draft(1, 0.3)
    sched.gate.debt = 100.0  # no probe is due
    sched.online[:] = 0.01  # drafts were almost never accepted
    for _ in range(3):  # plain rounds
        assert not sched.should_draft(rows)
        sched.observe(rows, None, None, 1.0)
    for _ in range(5):  # then drafted rounds (as probes would be) accept both drafts every time
        sched.observe(rows, torch.tensor([2]), torch.tensor([2]), 1.5)
    assert sched.should_draft(rows)


def test_a_plain_streak_asks_the_gate_once_and_is_observed_as_one_measurement():
    """Once the gate says plain, ``plain_streak`` rounds run without asking it; the streak reaches the gate as
    one observation of its summed rounds (the same slowdown ratio as round by round); a row leaving ends it."""
    cost = VerifyCostModel([1, 2], [1, 2], [[1.0, 1.5], [1.2, 1.8]], {})
    sched = VerifyScheduler(ScheduleConfig(policy="scheduled_with_draft_cost", plain_streak=4), 2, cost, [1.0, 1.0])
    asked = []
    decide = sched.gate.should_draft
    sched.gate.should_draft = lambda *a: asked.append(a[0]) or decide(*a)
    sched.start(2)
    rows = torch.tensor([0, 1])
    for _ in range(10):
        assert not sched.should_draft(rows)
        sched.observe(rows, None, None, 2.4)  # 2x the profile's 1.2 s
    assert asked == [2, 2, 2]  # rounds 1, 5 and 9
    by_load = sched.gate.slowdown[False][2]
    assert len(by_load) == 2 and by_load.value == pytest.approx(2.0)  # two whole streaks observed; round 9 is running
    assert sched.gate.debt == 0.0
    assert not sched.should_draft(rows[:1])  # a row left: the streak ends there and the gate decides for one row
    assert asked == [2, 2, 2, 1] and len(by_load) == 3  # the cut streak (2 rounds) was observed too


def test_gate_scales_each_arm_by_its_measured_round_time():
    """The profile says a drafted round pays; measured rounds say the loop loses -> the gate stops drafting."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    gate = DraftGate(budget=0.02)
    good = torch.full((1, 2), 0.6, dtype=torch.float64)
    gate.observe_draft(1, 0.3)
    time_plain(gate, 1, 1.0, cost)
    assert gate.should_draft(*gains(good), cost) and gate.probing  # predicted 2.2 / 1.5 = 1.47 tokens/s > 1; a probe:
    gate.probing = False  # the drafted arm was never timed here. The rounds below stand for rounds drafted to win:
    for _ in range(20):  # drafted rounds really take 1.8x their prediction; plain rounds as predicted
        gate.observe_round(1, True, 3, 2, 1.8 * (1.2 + 0.3), cost)
        gate.observe_round(1, False, 1, 1, 1.0, cost)
    assert gate.ratio(True, 1) == pytest.approx(1.8) and gate.ratio(False, 1) == pytest.approx(1.0)
    decisions = []
    for _ in range(12):
        decisions.append(gate.should_draft(*gains(good), cost))
        gate.observe_round(1, decisions[-1], 3 if decisions[-1] else 1, 2 if decisions[-1] else 1,
                           3.0 if decisions[-1] else 1.0, cost)
    assert decisions.count(True) == 1  # one probe (it costs 1 s more than plain: repaid over 50 plain seconds)
    for _ in range(20):  # and when plain rounds are the slow ones (say, a plain step's bookkeeping), drafting wins again
        gate.observe_round(1, False, 1, 1, 3.0, cost)
    assert all(gate.should_draft(*gains(good), cost) for _ in range(5))


def test_a_stalled_round_does_not_make_the_gate_draft():
    """Plain wins; one plain round stalls (30x, another process took the cores). An average of measured / predicted
    round time would jump and the gate would draft at a loss for the next rounds; the recent median does not move."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    gate = DraftGate(budget=0.02)
    low = torch.full((1, 2), 0.05, dtype=torch.float64)
    gate.observe_draft(1, 0.3)
    gate.debt = 100.0  # no probe is due
    for seconds in [1.0] * 9 + [30.0]:
        assert not gate.should_draft(*gains(low), cost)
        gate.observe_round(1, False, 1, 1, seconds, cost)
    assert not any(gate.should_draft(*gains(low), cost) for _ in range(5))


def test_catch_up_after_plain_rounds_is_charged_to_the_probe_budget_not_to_the_draft_cost():
    """The first drafted round after plain rounds builds the drafter's context for every skipped token: it is slow
    once. Its time must not become the draft cost (the gate would then refuse drafts that pay), but it is a debt."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    sched = VerifyScheduler(ScheduleConfig(policy="scheduled_with_draft_cost", plain_streak=1), 2, cost, [1.0, 1.0])
    rows, L, m = torch.tensor([0]), torch.tensor([2]), torch.tensor([0])
    sched.start(1)
    for _ in range(DraftGate.plain_samples):
        assert not sched.should_draft(rows)  # plain steps are timed first
        sched.observe(rows, None, None, 1.0)
    assert sched.should_draft(rows)  # no draft measured: draft (the prompt's catch-up makes it slow)
    sched.lengths(rows, torch.ones(1, 2), 5.0)
    sched.observe(rows, L, m, 6.2)
    assert not sched.gate.draft_seconds and not sched.gate.slowdown[True]  # not a cost: a catch-up
    assert sched.should_draft(rows)  # still nothing measured: draft again, now steady
    sched.lengths(rows, torch.ones(1, 2), 0.3)
    sched.observe(rows, L, m, 1.5)
    assert sched.gate.draft_cost(1) == 0.3 and sched.gate.ratio(True, 1) == pytest.approx(1.0)
    assert sched.gate.debt == pytest.approx((6.2 - 1.0) + (1.5 - 1.0))  # both measuring rounds were probes
    sched.observe(rows, None, None, 1.0)  # a plain round (repays the budget's share of its second): the next draft catches up again
    sched.gate.probing = True
    sched.lengths(rows, torch.ones(1, 2), 4.0)
    sched.observe(rows, L, m, 5.2)
    assert sched.gate.draft_cost(1) == 0.3 and sched.gate.debt == pytest.approx(5.7 - sched.gate.budget * 1.0 + (5.2 - 1.0))


def test_a_losing_probe_waits_until_plain_time_has_prepaid_its_catch_up():
    """Serving trace (24 rows, T = 1): a probe's first drafted round caught up every row's whole prompt, 1.6 s for 38
    tokens (~20 plain steps), and the debt then blocked probes for ~300 s: each load paid one such probe. A probe
    while plain wins now waits until plain rounds have repaid, beyond the debt, its predicted loss: the catch-up
    tokens x the loss per catch-up token of the last switches. A catch-up that grows past it is never prepaid."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    gate = DraftGate(budget=0.125)  # each plain second repays 1/8 s (binary fractions: exact sums)
    gate.observe_draft(1, 0.1)
    time_plain(gate, 1, 1.0, cost)
    gate.observe_round(1, True, 3, 1, 1.25, cost)  # the drafted arm, timed
    low = torch.full((1, 2), 0.01, dtype=torch.float64)  # its drafts are almost never accepted: plain wins
    queued = [20]

    def plain_rounds_before_a_probe(limit: int) -> int | None:
        for n in range(limit + 1):
            if gate.should_draft(*gains(low), cost, catch_up=lambda: queued[0]):
                assert gate.probing
                return n
            gate.observe_round(1, False, 1, 1, 1.0, cost)
        return None

    assert plain_rounds_before_a_probe(0) == 0  # no switch priced yet: probe at once
    gate.observe_round(1, True, 3, 1, 11.0, cost, steady=False)  # its catch-up lost 10 s over 20 tokens
    assert gate.catch_up_loss.value == 0.5 and gate.debt == 10.0
    queued[0] = 4  # a short queue: 2 s predicted
    assert plain_rounds_before_a_probe(1000) == 80 + 16  # the 10 s debt repaid (80 rounds), then the 2 s prepaid
    gate.observe_round(1, True, 3, 1, 3.0, cost, steady=False)  # it lost the 2 s predicted
    assert gate.debt == 0.0
    queued[0] = 400  # 200 s predicted: 1,600 plain rounds first
    assert plain_rounds_before_a_probe(1599) is None
    assert plain_rounds_before_a_probe(0) == 0


def test_a_cold_first_plain_step_is_outvoted_before_the_gate_drafts():
    """The engine's first step is cold (4-5x a warm one on CPU). Timed once, plain would look 5x slower than it is;
    and while the gate drafts nothing times a plain step again, so it would draft for good at a loss (seen: an eval
    without a warm-up drafted 97% of its rounds at 1 row). Plain steps are timed a few times at a load first."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.0, 1.0]], {})
    gate = DraftGate(budget=0.0)
    sure = torch.ones(1, 2, dtype=torch.float64)
    for seconds in [5.0, 1.0, 1.0]:
        assert not gate.should_draft(*gains(sure), cost)
        gate.observe_round(1, False, 1, 1, seconds, cost)
    assert gate.plain_seconds(1, cost) == 1.0


def test_a_burst_of_contention_seen_by_the_plain_arm_alone_does_not_make_drafting_win():
    """Seen in an R = 1 trace on a shared VM: the last 9 plain rounds ran 4x slower (another process), the drafted
    arm's ratio was from calmer rounds, and the gate drafted rounds that were expected to accept ~nothing."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    gate = DraftGate(budget=0.0)
    gate.observe_draft(1, 0.3)
    time_plain(gate, 1, 1.0, cost)
    gate.observe_round(1, True, 3, 1, 1.5, cost)  # drafted rounds as predicted, in calm rounds
    for _ in range(9):
        gate.observe_round(1, False, 1, 1, 4.0, cost)  # then a burst, during plain rounds
    hopeless = torch.full((1, 2), 0.01, dtype=torch.float64)
    assert not gate.should_draft(*gains(hopeless), cost)


def test_a_profile_wrong_at_one_load_is_corrected_at_that_load():
    """The profile says a plain step of 32 rows takes 64 s (it was measured while another process had the cores);
    it takes 32. Ratios learnt at 1 row (where the profile is right) must not carry over: the gate times a plain
    step at the new load before it ever drafts there, and then decodes plainly."""
    cost = VerifyCostModel([1, 32], [1, 2, 3], [[1.0, 1.1, 1.2], [64.0, 64.0, 64.0]], {})
    gate = DraftGate(budget=0.0)
    time_plain(gate, 1, 1.0, cost)
    gate.observe_draft(1, 0.1)
    gate.observe_round(1, True, 3, 2, 1.3, cost)
    fair = torch.full((32, 2), 0.3, dtype=torch.float64)
    assert not gate.should_draft(*gains(fair), cost)  # 32 rows: no plain step timed at this load yet
    time_plain(gate, 32, 32.0, cost)
    assert gate.ratio(False, 32) == pytest.approx(0.5) and gate.ratio(False, 1) == pytest.approx(1.0)  # each load its own
    assert not any(gate.should_draft(*gains(fair), cost) for _ in range(5))  # 51.2 tokens / 64.1 s < 32 / 32 s (and no probe: budget 0)


def test_drafting_at_a_load_never_timed_is_a_probe_charged_to_the_budget():
    """Session 23's R = 2 loss: a 2-row batch ends with a few 1-row rounds; there the drafted arm was never timed and
    borrowed the 2-row ratio (drafted rounds faster than predicted there), so the gate drafted at 1 row, where a
    drafted round really took 2x its prediction. Those rounds are now a measuring probe: charged to the budget, and
    the 1-row measurements decide from then on."""
    cost = VerifyCostModel([1, 2], [1, 2, 3], [[1.0, 1.0, 1.0], [1.2, 1.3, 1.4]], {})
    gate = DraftGate(budget=0.01)
    gate.observe_draft(2, 0.2)
    time_plain(gate, 2, 1.2, cost)
    gate.observe_round(2, True, 3, 4, 0.82 * 1.6, cost)  # 2 rows: drafted rounds 0.82 of their prediction
    time_plain(gate, 1, 1.0, cost)  # the 1-row tail: its plain step is timed
    good = torch.full((1, 2), 0.5, dtype=torch.float64)  # 1 + 0.5 + 0.5 tokens / (0.82 x 1.2 s) = 2.0/s > 1/s
    drafted, losses = 0, 0.0
    for round_ in range(20):
        if gate.should_draft(*gains(good), cost, steady=drafted > 0):
            assert gate.probing  # the drafted arm was never timed at 1 row
            drafted += 1
            gate.observe_round(1, True, 3, 1, 2.4, cost, steady=drafted > 1)  # 2x the prediction, nothing accepted
            losses += 2.4 - 1.0
        else:
            gate.observe_round(1, False, 1, 1, 1.0, cost)
    assert drafted == 2  # the catch-up round, then the steady one that times 1 row; then plain, the next probe waits
    assert gate.debt == pytest.approx(losses - 0.01 * (20 - 2))  # until the plain rounds repay the 2.8 s lost


def test_a_measuring_probe_that_measured_nothing_waits_for_its_debt():
    """A measuring probe's catch-up round without the steady round after it (the rows finished, another proposer took
    the round) times nothing; the next one waits until plain rounds repay its loss, the very first included (it used
    to be free while no draft was timed: the hybrid ran one at every match-less round). At budget 0 the first draft
    is still measured, once."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    high = torch.ones(1, 2, dtype=torch.float64)
    for budget in (0.1, 0.0):
        gate = DraftGate(budget=budget)
        time_plain(gate, 1, 1.0, cost)
        assert gate.should_draft(*gains(high), cost) and gate.probing
        gate.observe_round(1, True, 3, 1, 2.3, cost, steady=False)  # the catch-up round, 1.3 s lost; no steady round
        plain_rounds = 0
        while not gate.should_draft(*gains(high), cost) and plain_rounds < 100:
            gate.observe_round(1, False, 1, 1, 1.0, cost)
            plain_rounds += 1
        assert plain_rounds == (13 if budget else 100)  # 1.3 s repaid at 10% of each plain second; at budget 0 never


def test_the_gate_discounts_an_acceptance_estimate_selected_at_its_highs():
    """The gate drafts when a row's acceptance estimate is high; an estimate selected at its highs overstates what the
    next round accepts. Drafts accepted / drafts promised in the rounds drafted to win scales the prediction."""
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.1, 1.2]], {})
    gate = DraftGate(budget=0.0)
    gate.observe_draft(1, 0.3)
    time_plain(gate, 1, 1.0, cost)
    gate.observe_round(1, True, 3, 2, 1.5, cost, steady=True)
    hopeful = torch.tensor([[0.7, 0.49]], dtype=torch.float64)  # promises 1.19 drafts: 2.19 tokens / 1.5 s = 1.46/s
    assert gate.should_draft(*gains(hopeful), cost) and not gate.probing
    for accepted in [1, 0, 0] * 4:  # really 0.33 drafts a round: 1.33 / 1.5 s < 1/s
        gate.observe_round(1, True, 3, 1 + accepted, 1.5, cost, promised=1.19)
    assert gate.acceptance_ratio(1) == pytest.approx((2 + 4) / (2 + 12 * 1.19))  # 2 drafts of prior on both sides
    assert not gate.should_draft(*gains(hopeful), cost)
    unlucky = DraftGate(budget=0.0)
    unlucky.observe_round(1, True, 3, 1, 1.5, cost, promised=1.19)
    assert unlucky.acceptance_ratio(1) > 0.5  # one round that accepted nothing does not shut drafting out for good
    sched = VerifyScheduler(ScheduleConfig(policy="scheduled_with_draft_cost"), 3, cost, [1.0] * 3)
    sched.start(2)  # estimate 0.5 per slot: survival 0.5, 0.25, 0.125
    sched.observe(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([1, 0]), 1.0)
    assert list(sched.gate.accepted[2]) == [(1, 0.5 + 0.75)]  # promised: the survival of the verified slots only


def test_drafting_must_win_by_the_margin():
    cost = VerifyCostModel([1], [1, 2, 3], [[1.0, 1.0, 1.0]], {})
    barely = torch.tensor([[0.05, 0.0]], dtype=torch.float64)  # 1.05 tokens / 1.0 s: 5% over a plain step
    for margin, drafts in [(0.0, True), (0.1, False)]:
        gate = DraftGate(budget=0.0, margin=margin)
        gate.observe_draft(1, 0.0)
        time_plain(gate, 1, 1.0, cost)
        gate.observe_round(1, True, 2, 1, 1.0, cost, steady=True)
        assert gate.should_draft(*gains(barely), cost) == drafts


def test_cost_profile_is_made_monotone():
    """A stall while profiling (a 1-row step "costing" 30x an 8-row one) is repaired: a forward never costs
    more than a larger one."""
    m = VerifyCostModel([1, 2, 8], [1, 2], [[0.3, 0.011], [0.010, 0.3], [0.012, 0.015]], {})
    assert m.seconds == [[0.010, 0.011], [0.010, 0.015], [0.012, 0.015]]


def test_a_new_generation_starts_from_the_acceptance_seen_so_far():
    sched = VerifyScheduler(ScheduleConfig(policy="scheduled_with_draft_cost"), 3,
                            VerifyCostModel([1], [1, 2, 3, 4], [[1.0, 1.0, 1.0, 1.0]], {}))
    sched.start(2)
    assert sched.online.tolist() == [[0.5] * 3] * 2
    rows = torch.tensor([0, 1])
    for _ in range(40):  # both rows: slot 1 always accepted, slot 2 always rejected
        sched.observe(rows, torch.tensor([3, 3]), torch.tensor([1, 1]), 0.01)
    sched.start(1)
    assert sched.online[0, 0] > 0.95 and sched.online[0, 1] < 0.05 and sched.online[0, 2] == 0.5  # slot 3 never verified


def test_cost_model_interpolates_and_is_cached_per_target(tmp_path, tiny_target, monkeypatch):
    from deepspec.config.data import TargetConfig
    from deepspec.target import TargetModel

    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine (the suite may run in parallel)

    m = VerifyCostModel([1, 4], [1, 2], [[1.0, 2.0], [4.0, 8.0]], {})
    assert m(2, 1) == 2.0 and m(8, 2) == 16.0 and m(1, 5) == 2.0  # interpolated, extrapolated, width clamped
    target = TargetModel.from_config(TargetConfig(name_or_path=str(tiny_target), layer_ids=[0]))
    first = VerifyCostModel.load_or_profile(target, max_rows=2, max_width=3, cache_dir=str(tmp_path))
    assert first.rows == [1, 2] and first.widths == [1, 2, 3] and all(s > 0 for line in first.seconds for s in line)
    again = VerifyCostModel.load_or_profile(target, max_rows=2, max_width=3, cache_dir=str(tmp_path))
    assert again.seconds == first.seconds  # read back, not measured again
    (next((tmp_path / "verify_cost").glob("*.json"))).write_text("{not json")
    assert VerifyCostModel.load_or_profile(target, 2, 3, cache_dir=str(tmp_path)).rows == [1, 2]  # corrupt: measured again
    assert (next((tmp_path / "verify_cost").glob("*.json"))).read_text() != "{not json"


def test_a_cost_profile_taken_while_the_cpu_is_busy_is_kept_flagged_busy(tmp_path, tiny_target, monkeypatch, caplog):
    from deepspec.config.data import TargetConfig
    from deepspec.target import TargetModel

    target = TargetModel.from_config(TargetConfig(name_or_path=str(tiny_target), layer_ids=[0]))
    monkeypatch.setattr("os.getloadavg", lambda: (3.0 * (os.cpu_count() or 1), 0.0, 0.0))  # another job has the cores
    with caplog.at_level("WARNING"):
        assert VerifyCostModel.load_or_profile(target, max_rows=2, max_width=2, cache_dir=str(tmp_path)).rows == [1, 2]
    assert "while the CPU was busy" in caplog.text  # kept, flagged busy: measured again by a run on a quiet CPU
    assert {quiet for *_, quiet in json.loads(next(tmp_path.glob("verify_cost/*.json")).read_text())["points"]} == {False}


def test_a_zero_survival_row_verifies_nothing_even_when_other_rows_widen_the_batch():
    a = torch.tensor([[0.9, 0.9, 0.9], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    assert choose_lengths(a, lambda W: 1.0).tolist() == [3, 0, 1]
    conf = torch.tensor([[0.9, 0.9], [0.0, 0.0]])
    assert prefix_schedule(conf, lambda b: 1.0) == [2, 0]  # free verification still never admits survival 0
