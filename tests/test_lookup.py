"""The training-free proposer (n-gram lookup) and the hybrid of it with a drafter: exact, and chosen by cost.

Lookup proposals are deterministic, so their q is one-hot; rows of one batch take plain steps, lookup proposals or
the drafter's block in one verify pass. Whole generations are held to the target's enumerated law
(``tests/test_exact_law.py``'s harness) with every source mixed in ragged batches at T > 0; the drafter's q taken for a
lookup proposal must fail that test, while a one-hot q taken for the drafter's tokens stays exact (it only accepts
less: the test says why).
Greedy output equals plain greedy output on generated cases. The gate's choice is checked on a synthetic cost model.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepspec.config.decoding import ScheduleConfig
from deepspec.decoding.hybrid import HybridScheduler, LookupAcceptance, make_engine_session, make_scheduler
from deepspec.decoding.scheduler import RecentMedian, VerifyCostModel
from deepspec.decoding.sessions import lookup as lookup_mod
from deepspec.decoding.sessions.draft import Draft
from deepspec.decoding.sessions.lookup import LOOKUP, MODEL, PLAIN, HybridSession, NgramIndex, Proposal, one_hot_q
from deepspec.decoding.speculative import autoregressive_generate_batch, speculative_generate_batch
from deepspec.decoding.verify import SamplingConfig
from test_exact_law import DRAWS, NEW, P_MIN, PROMPTS, V, chi2_pvalue, cost_model, drafter, exact_law, tiny_target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_target(tmp_path_factory.mktemp("v6_lookup"))


# ----------------------------------------------------------------------------- the n-gram index
def test_the_longest_latest_match_proposes_what_followed_it():
    idx = NgramIndex(1, 3)
    idx.append([5, 1, 2, 9, 1, 2, 7, 8, 3])
    assert idx.match([1, 2], 4, own=True) == ([7, 8, 3, 2], 2)  # latest [1, 2], then into the anchor (2)
    assert idx.match([4, 9], 2, own=True) == ([1, 2], 1)  # no [4, 9]: the unigram [9]
    assert idx.match([4, 6], 3, own=True) == ([], 0)
    assert idx.match([8, 3], 3, own=False) == ([], 0)  # another row's index: nothing after its end


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2), st.lists(st.lists(st.integers(0, 3), max_size=40), min_size=1, max_size=5))
def test_an_index_built_in_chunks_equals_one_built_token_by_token(min_n, extra, chunks):
    """Long appends take the bulk path (``NgramIndex.BULK``), short ones the loop: whatever the split, every n-gram
    maps to its latest end (the definition, written out here token by token)."""
    max_n, idx = min_n + extra, NgramIndex(min_n, min_n + extra)
    for chunk in chunks:
        idx.append(chunk)
    tokens = [t for chunk in chunks for t in chunk]
    latest = {tuple(tokens[e - n + 1: e + 1]): e for e in range(len(tokens)) for n in range(min_n, min(max_n, e + 1) + 1)}
    assert idx.tokens == tokens and idx.last == latest


def test_a_session_matches_each_row_on_its_own_context_then_the_shared_index():
    shared = NgramIndex(2, 2)
    s = lookup_mod.LookupSession(2, 3, 2, 2, V, shared)
    s.extend(None, torch.tensor([[1, 2, 3, 1], [4, 5, 0, 0]]), torch.tensor([[True] * 4, [True, True, False, False]]))
    p = s.propose(torch.tensor([0, 1]), torch.tensor([2, 2]))  # row 0: [1, 2] seen, then 3, 1 and the anchor; row 1: [5, 2] nowhere
    assert p.tokens[0] == [3, 1, 2] and p.length == [3, 0] and p.score == [2, 0]
    s.extend(None, torch.tensor([[0], [3]]), torch.tensor([[False], [True]]))
    p = s.propose(torch.tensor([1]), torch.tensor([1]))  # row 1's [3, 1] is not in its own context: row 0's, shared
    assert p.tokens[0] == [4, 5, 3] and p.score == [2]
    s.extend(None, torch.tensor([[7, 8], [9, 0]]), torch.tensor([[True, True], [True, False]]))
    assert shared.tokens[-3:] == [7, 8, 9]  # indexed at once, no proposal needed: the shared index outlives the session


def test_a_rows_tokens_wait_for_its_next_proposal_in_order():
    """Rounds queued while no proposal is asked for (ragged validity, a row that stopped) reach each row's index in
    order at the next proposal, the same index a proposal every round would have read."""
    s = lookup_mod.LookupSession(2, 2, 1, 2, V)
    s.extend(None, torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[True] * 3, [True, True, False]]))
    for tokens, valid in (([[4], [7]], [[True], [True]]), ([[1], [6]], [[True], [False]]), ([[2], [0]], [[True], [False]])):
        s.extend(None, torch.tensor(tokens), torch.tensor(valid))
    assert s.rows[0].tokens == [] and len(s.pending) == 4
    p = s.propose(torch.tensor([0, 1]), torch.tensor([3, 5]))
    assert s.rows[0].tokens == [1, 2, 3, 4, 1, 2] and s.rows[1].tokens == [4, 5, 7] and not s.pending
    assert p.tokens == [[4, 1], [7, 5]] and p.score == [2, 1]  # row 0: [2, 3], then 4, 1; row 1: no [7, 5]; [5], then 7


def test_a_proposal_drafts_laws_are_built_for_the_verified_slots_only():
    """One-hot laws for the lookup's rows and the drafter's own for its rows (zero past its block), as the dense
    (N, G, V) q would hold them, sliced to the W-1 slots a round verifies; none when greedy."""
    tokens = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 0], [3, 3, 3, 3]])
    dq = torch.softmax(torch.randn(1, 2, V, generator=torch.Generator().manual_seed(0)), -1)  # row 1: the drafter's block of 2
    d = lookup_mod.ProposalDraft(tokens, dq, torch.ones(3, 4), vocab_size=V, sampled=True, model_rows=torch.tensor([1]))
    dense = one_hot_q(tokens, V)
    dense[1] = torch.cat([dq[0], torch.zeros(2, V)])
    for W in range(1, 6):
        assert torch.equal(d.verified_q(W), dense[:, : W - 1])
    assert lookup_mod.ProposalDraft(tokens, None, torch.ones(3, 4), vocab_size=V).verified_q(3) is None


# ----------------------------------------------------------------------------- the exact law
class RandomSources(HybridScheduler):
    """Sources drawn at random per row and round, independently of the drafts (so any of them is lossless): a quarter
    of the rounds all plain, else each row plain, lookup (where it has a match) or the drafter; lengths by Algorithm 1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen = torch.Generator().manual_seed(3)

    def wants_proposal(self, rows):
        return True  # every round draws its sources from the proposals

    def should_draft(self, rows, proposal=None):
        self._end_streak()
        u = torch.randint(0, 4, (len(rows),), generator=self.gen)
        if int(u[0]) == 0 and float(torch.rand((), generator=self.gen)) < 0.5:
            return False
        matched = torch.tensor(proposal.length) > 0
        source = torch.where(u >= 2, MODEL, torch.where((u == 1) & matched, LOOKUP, PLAIN))
        proposal.source = source
        self._round = source, self.lookup.survival(proposal), proposal
        return True


def draw_hybrid(tiny, sampling: SamplingConfig, scheduler_cls=RandomSources, policy: str = "hybrid", seed: int = 0,
                keep: bool = False):
    """DRAWS generations per prompt through the real batched loop, the two prompts interleaved (ragged rows)."""
    target = tiny[0]
    prompts = [PROMPTS[i % 2] for i in range(2 * DRAWS)]
    d = drafter("vanilla", tiny)
    # the lookup proposes up to 4 tokens, one more than the drafter's block of 3: rows of both widths in one verify
    cfg = ScheduleConfig(policy=policy, lookup_min_ngram=1, lookup_max_ngram=2, lookup_tokens=4, draft_margin=0.0)
    sched = scheduler_cls(cfg, 3, cost_model(4, 0.05))
    for R in range(1, 2 * DRAWS + 1):  # the synthetic profile is the truth: every load's plain step "timed" as predicted
        for _ in range(sched.gate.plain_samples):
            sched.gate.observe_round(R, False, 1, R, sched.cost(R, 1), sched.cost)
    res = speculative_generate_batch(target, make_engine_session(sched, d, len(prompts), V), prompts, NEW, sampling, None,
                                     torch.Generator().manual_seed(seed), sched)
    sources = {s for r in res for s in r.source_per_round}
    samples = [[r.tokens for r in res[i::2]] for i in range(2)]
    return (samples, sources, res) if keep else (samples, sources)


def law_p(tiny, samples, sampling) -> float:
    return min(chi2_pvalue(got, exact_law(tiny[0], prompt, sampling)) for prompt, got in zip(PROMPTS, samples))


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0), SamplingConfig(0.7, top_k=4)], ids=["T1", "T0.7-k4"])
def test_lookup_drafter_and_plain_rows_mixed_follow_the_target_law(tiny, sampling):
    samples, sources = draw_hybrid(tiny, sampling)
    assert sources == {PLAIN, LOOKUP, MODEL}
    assert law_p(tiny, samples, sampling) > P_MIN


@pytest.mark.parametrize("policy", ["lookup", "hybrid", "lookup_rule"])
def test_the_lookup_policies_follow_the_target_law(tiny, policy):
    sampling = SamplingConfig(1.0)
    samples, sources = draw_hybrid(tiny, sampling, HybridScheduler, policy)
    assert LOOKUP in sources
    assert law_p(tiny, samples, sampling) > P_MIN


def test_a_one_hot_q_for_the_drafters_tokens_stays_exact_and_accepts_less(tiny, monkeypatch):
    """The other way round is not an error of law: a block drawn before verification, independently of the target's
    draws, is a fixed sequence to the verifier, and a fixed sequence verified with its one-hot q gives p exactly (that
    is why lookup is exact). It accepts less: sum_x q(x) p(x) per slot instead of sum_x min(p(x), q(x))."""
    draft = HybridSession.draft

    def one_hot_for_all(self, rows, anchors, sampling, generator):
        out = draft(self, rows, anchors, sampling, generator)
        return Draft(out.tokens, one_hot_q(out.tokens, self.lookup.V), out.confidence, out.source)

    sampling = SamplingConfig(1.0)
    accepted = lambda: sum(m for r in draw_hybrid(tiny, sampling, keep=True)[2] for m, s in  # noqa: E731
                           zip(r.accepted_per_round, r.source_per_round) if s == MODEL)
    right = accepted()
    monkeypatch.setattr(HybridSession, "draft", one_hot_for_all)
    samples, _, _ = draw_hybrid(tiny, sampling, keep=True)
    assert law_p(tiny, samples, sampling) > P_MIN
    assert accepted() < 0.9 * right


def test_the_drafters_q_for_a_lookup_proposal_is_caught(tiny, monkeypatch):
    """A lookup row verified with the q the drafter would have drafted from (the drafter runs on every row)."""

    def drafter_q_for_all(self, rows, anchors, sampling, generator):
        out = self.lookup.draft(rows, anchors, sampling, generator)
        source = self.lookup.proposal.source
        d, g = self.model.draft(rows, anchors, sampling, generator), self.model.block_size
        model = (source == MODEL)[:, None]
        out.tokens[:, :g] = torch.where(model, d.tokens, out.tokens[:, :g])
        out.confidence = out.confidence * (source == LOOKUP)[:, None]
        out.confidence[:, :g] = torch.where(model, d.confidence.float(), out.confidence[:, :g])
        out.confidence[:, g:] *= ~model
        q = one_hot_q(out.tokens, self.lookup.V)
        q[:, :g] = d.q.float()  # slots past the drafter's block keep the lookup's one-hot q
        return Draft(out.tokens, q, out.confidence, source)

    monkeypatch.setattr(HybridSession, "draft", drafter_q_for_all)
    sampling = SamplingConfig(1.0)
    assert law_p(tiny, draw_hybrid(tiny, sampling)[0], sampling) < 1e-12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(["lookup", "hybrid", "lookup_rule", "random"]), block=st.integers(1, 4),
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), max_new=st.integers(1, 14),
       eos=st.sampled_from([None, 0, 1, 2, 3, 4, 5]), shared=st.booleans(), seed=st.integers(0, 1000),
       wider=st.integers(0, 3))
def test_greedy_equals_plain_greedy_with_lookup_proposals(tiny, policy, block, lengths, max_new, eos, shared, seed, wider):
    """Prompts made of a repeated random motif (matches occur), EOS and max_new_tokens inside a block, ragged rows."""
    target = tiny[0]
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, V, (3,), generator=g)
    prompts = [torch.cat([motif.repeat(4)[:n], torch.randint(0, V, (2,), generator=g)]) for n in lengths]
    greedy = SamplingConfig(temperature=0)
    ref = [r.tokens for r in autoregressive_generate_batch(target, prompts, max_new, greedy, eos)]
    G = block + wider  # the lookup's proposals may be longer than the drafter's block
    cfg = ScheduleConfig(policy="hybrid" if policy == "random" else policy, lookup_tokens=G, lookup_shared=shared,
                         draft_margin=0.0)
    sched = (RandomSources(cfg, block, cost_model(G, 0.05)) if policy == "random"
             else make_scheduler(cfg, block, cost_model(G, 0.05)))
    for R in range(1, len(prompts) + 1):
        for _ in range(sched.gate.plain_samples):
            sched.gate.observe_round(R, False, 1, R, sched.cost(R, 1), sched.cost)
    session = make_engine_session(sched, drafter("vanilla", tiny, block), len(prompts), V)
    got = speculative_generate_batch(target, session, prompts, max_new, greedy, eos, None, sched)
    assert [r.tokens for r in got] == ref
    for r in got:
        assert sum(r.emitted_per_round) + 1 == len(r.tokens)
        assert len(r.source_per_round) == len(r.emitted_per_round)


# ----------------------------------------------------------------------------- the gate's choice
def gate_with(policy: str, column_cost: float, g: int = 4, probe_budget: float = 0.005) -> HybridScheduler:
    cost = VerifyCostModel([1, 4], list(range(1, g + 2)), [[r * (1 + column_cost * (w - 1)) for w in range(1, g + 2)] for r in (1, 4)], {})
    cfg = ScheduleConfig(policy=policy, lookup_max_ngram=3, lookup_tokens=g, draft_margin=0.1, probe_budget=probe_budget)
    sched = make_scheduler(cfg, g, cost)
    sched.start(3)
    for _ in range(sched.gate.plain_samples):
        sched.gate.observe_round(3, False, 1, 3, cost(3, 1), cost)
    sched.lookup.table[3], sched.lookup.table[1] = 0.95, 0.1  # long matches copy well, unigram matches do not
    sched.lookup._update()
    return sched


def proposal(scores: list[int], g: int = 4) -> Proposal:
    return Proposal([[1] * g for _ in scores], [g if n else 0 for n in scores], scores, torch.device("cpu"))


def test_the_lookup_is_taken_where_it_pays_and_plain_where_it_cannot():
    sched = gate_with("lookup", 0.2)
    sched.lookup_debt = 1.0  # no probe allowed: proposals are read because a long match's estimate beats plain steps
    p = proposal([3, 1, 0])
    assert sched.wants_proposal(torch.arange(3)) and sched.should_draft(torch.arange(3), p)
    assert p.source.tolist() == [LOOKUP, LOOKUP, PLAIN]
    L = sched.lengths(torch.arange(3), torch.zeros(3, 4), 0.0)
    assert L.tolist() == [4, 4, 0]  # Algorithm 1 admits columns: the unigram row rides along in the padded forward
    no_probe = gate_with("lookup", 3.0, probe_budget=0.0)
    assert not no_probe.should_draft(torch.arange(3), proposal([3, 1, 0]))  # a column costs 3 steps
    assert not no_probe.wants_proposal(torch.arange(3))  # so no proposal is even asked for


def test_a_losing_lookup_probes_on_its_budget_and_learns_again():
    """An estimate that says the lookup loses still gets a one-token probe, paid back by plain rounds before the next."""
    sched, rows = gate_with("lookup", 3.0, probe_budget=0.1), torch.arange(3)
    sched.lookup.table[3] = 0.05  # a few misses pulled the long matches' estimate down: the lookup "never" pays
    sched.lookup._update()
    assert sched.wants_proposal(rows) and sched.should_draft(rows, proposal([3, 1, 0]))  # the probe: matched rows verify one token each
    assert sched.lengths(rows, torch.zeros(3, 4), 0.0).tolist() == [1, 1, 0]
    plain = sched.gate.plain_seconds(3, sched.cost)
    sched.observe(rows, torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]), 2 * plain)  # 4 tokens for 2 plain steps' time
    assert sched.lookup.table[3, 0] > 0.05  # the probe's hit raised the long matches' estimate
    assert sched.lookup_debt == pytest.approx(2 * plain - 4 * plain / 3)
    assert not sched.should_draft(rows, proposal([3, 1, 0]))  # in debt: plain
    # and no proposal is asked for: even the best match length's estimate cannot beat a plain step, nor may it probe
    assert not sched.wants_proposal(rows)
    for _ in range(6):  # each plain round repays 10% of its time: 0.67 plain steps of debt take 7 rounds
        sched.observe(rows, None, None, plain)
        assert sched.lookup_debt > 0 and not sched.should_draft(rows, proposal([3, 1, 0])) and not sched.wants_proposal(rows)
    sched.observe(rows, None, None, plain)
    assert sched.lookup_debt == 0 and sched.wants_proposal(rows) and sched.should_draft(rows, proposal([3, 1, 0]))



def test_the_hybrid_gives_each_row_the_source_that_expects_more():
    sched = gate_with("hybrid", 0.2)
    sched.online[:] = 0.8  # the drafter is accepted 80% per slot on every row
    sched.gate.observe_round(3, True, 5, 6, sched.cost(3, 5), sched.cost)  # the drafted arm timed as predicted
    p = proposal([3, 1, 0])
    # lookup rounds measured 3x slower than predicted: the lookup alone loses (and may not probe), yet the drafter's
    # round reads the proposals: a row whose match expects more drafts than the drafter's block takes it
    sched.lookup_debt, sched.lookup_slowdown[(3).bit_length()] = 1.0, RecentMedian(3.0)
    assert sched.wants_proposal(torch.arange(3)) and sched.should_draft(torch.arange(3), p)
    assert p.source.tolist() == [LOOKUP, MODEL, MODEL]


def test_a_lookup_round_measured_to_lose_is_not_taken_because_the_drafter_wins():
    """Every row expects more from its match than from the drafter, lookup rounds are measured to lose to plain (3x
    their predicted time) and the drafter is predicted to win: sent to the lookup row by row, the round would be a
    lookup round that the cost model rejected, every round (seen at 1 copy_edit row: none of the lookup arm's plain
    rounds). A drafter round expects fewer accepted drafts on these rows, at a draft's cost more: plain."""
    sched, rows = gate_with("hybrid", 0.2), torch.arange(3)
    sched.online[:] = 0.8
    sched.gate.observe_round(3, True, 5, 6, sched.cost(3, 5), sched.cost)  # the drafted arm timed as predicted
    sched.lookup_slowdown[(3).bit_length()] = RecentMedian(3.0)
    sched.lookup_debt = 1.0  # no lookup probe owed
    assert not sched.should_draft(rows, proposal([3, 3, 3]))
    p = proposal([3, 3, 0])  # a row without a match: the drafter's round, the matched rows ride on the lookup
    assert sched.should_draft(rows, p) and p.source.tolist() == [LOOKUP, LOOKUP, MODEL]


def test_the_drafters_probe_drafts_every_row_and_is_paid_for():
    """Where plain beats both sources, the drafter's probe drafts every row. Rows sent to the lookup instead (each
    expects more from its match than from the drafter) would run a lookup round that neither the cost model chose
    nor any budget prices, and the gate, still owed no probe, would do it again every round."""
    sched, rows = gate_with("hybrid", 0.5, probe_budget=0.1), torch.arange(3)
    sched.lookup.table[3] = 0.5  # long matches no better than a coin: plain beats the lookup at this cost
    sched.lookup._update()
    p = proposal([3, 3, 3])
    assert sched.should_draft(rows, p) and sched.gate.probing
    assert p.source.tolist() == [MODEL] * 3
    L = sched.lengths(rows, torch.full((3, 4), 0.5), 0.01)
    sched.observe(rows, L, torch.zeros(3, dtype=torch.long), 5 * sched.gate.plain_seconds(3, sched.cost))
    assert sched.gate.debt > 0  # the losing probe is owed
    p = proposal([3, 3, 3])
    sched.should_draft(rows, p)
    assert p.source is None or MODEL not in p.source.tolist()  # no drafter round until it is paid for


def test_the_drafters_measuring_probe_keeps_its_steady_round_when_the_lookup_wins():
    """The drafter, never timed at this load, is predicted to win a round without matches: a measuring probe, whose
    first round pays the catch-up and whose second, steady round times the drafted arm. Given to the lookup (it wins
    the next round), the probe measured nothing and came back at every match-less round, a catch-up each time (the
    hybrid at 1 copy_edit row: 29 catch-up rounds, 16% of its decoding)."""
    sched, rows = gate_with("hybrid", 0.2), torch.arange(3)
    sched.online[:] = 0.8
    p = proposal([0, 0, 0])
    assert sched.should_draft(rows, p) and sched.gate.probing and p.source.tolist() == [MODEL] * 3
    L = sched.lengths(rows, torch.full((3, 4), 0.8), 0.01)
    sched.observe(rows, L, torch.ones(3, dtype=torch.long), 3 * sched.gate.plain_seconds(3, sched.cost))  # the catch-up
    p = proposal([3, 3, 3])  # the lookup wins this round, but it is the probe's steady round
    assert sched.should_draft(rows, p) and p.source.tolist() == [MODEL] * 3
    L = sched.lengths(rows, torch.full((3, 4), 0.8), 0.01)
    sched.observe(rows, L, torch.ones(3, dtype=torch.long), sched.cost(3, 1 + int(L.max())) + 0.01)
    assert (3).bit_length() in sched.gate.slowdown[True]  # the drafted arm is timed at this load
    p = proposal([3, 3, 3])
    assert sched.should_draft(rows, p) and not sched.gate.probing and MODEL not in p.source.tolist()  # no probe now


def test_plain_rounds_reach_the_gate_in_streaks():
    """The gate's plain arm is observed once per ``plain_streak`` plain rounds (its arithmetic is most of a plain
    round's bookkeeping); a new generation hands over what is left."""
    sched, rows, calls = gate_with("hybrid", 0.2), torch.arange(3), []
    real = sched.gate.observe_round
    sched.gate.observe_round = lambda *a, **k: calls.append(k.get("rounds", 1)) or real(*a, **k)
    for _ in range(20):
        sched.observe(rows, None, None, 0.01)
    assert calls == [8, 8]
    sched.start(3)
    assert calls == [8, 8, 4]


def test_the_drafters_gate_is_asked_once_per_plain_streak_and_again_after_it():
    """While plain wins, a plain round asks nothing: the drafter's gate answers once per streak (its inputs change
    only when it observes one) and no proposal is made (the lookup can neither win nor probe). Once the streaks have
    repaid the drafter's probe debt, the gate is asked again, and probes."""
    sched, rows = gate_with("hybrid", 0.5, probe_budget=0.1), torch.arange(3)
    sched.lookup.table[:], sched.lookup_debt = 0.05, 1e9
    sched.lookup._update()
    plain, streak = sched.gate.plain_seconds(3, sched.cost), sched.cfg.plain_streak
    sched.gate.debt = 1.5 * streak * plain * sched.cfg.probe_budget  # two streaks repay it
    asked, real = [], sched.gate.should_draft
    sched.gate.should_draft = lambda *a, **k: asked.append(1) or real(*a, **k)
    for _ in range(2 * streak):
        assert not sched.wants_proposal(rows) and not sched.should_draft(rows)
        sched.observe(rows, None, None, plain)
    assert len(asked) == 2  # once per streak
    assert sched.gate.debt <= 0 and sched.wants_proposal(rows) and sched.gate.probing  # paid: asked again, it probes


def test_lookup_rounds_leave_the_drafters_plain_answer_standing():
    """A lookup round changes none of the drafter gate's inputs (it observes drafted rounds and plain streaks only):
    a run of lookup rounds asks it once."""
    sched, rows = gate_with("hybrid", 0.2), torch.arange(3)
    sched.gate.debt = 1.0  # the drafter's measuring probe waits for its debt: the gate says plain
    asked, real = [], sched.gate.should_draft
    sched.gate.should_draft = lambda *a, **k: asked.append(1) or real(*a, **k)
    for _ in range(3):
        p = proposal([3, 3, 3])
        assert sched.wants_proposal(rows) and sched.should_draft(rows, p) and p.source.tolist() == [LOOKUP] * 3
        L = sched.lengths(rows, torch.zeros(3, 4), 0.0)
        sched.observe(rows, L, L, sched.cost(3, 1 + int(L.max())))
    assert len(asked) == 1


def test_lookup_acceptance_learns_per_match_length_and_slot():
    acc = LookupAcceptance(3, 3, ema=1.0)
    acc.observe(torch.tensor([2, 1]), torch.tensor([3, 2]), torch.tensor([1, 2]))
    assert acc.table[2].tolist() == [1.0, 0.0, 0.0]  # slot 3 never verified (after a rejection): slot 2's estimate
    assert acc.table[1].tolist() == [1.0, 1.0, 1.0]  # L = 2: slot 3 never verified: slot 2's estimate
    assert acc.table[3].tolist() == [0.5, 0.5, 0.5]  # nothing verified at n = 3: the prior
    acc.observe(torch.tensor([2]), torch.tensor([3]), torch.tensor([3]))
    acc.observe(torch.tensor([2]), torch.tensor([3]), torch.tensor([0]))
    assert acc.table[2].tolist() == [0.0, 1.0, 1.0]  # slots after the first rejection were not judged: kept


def test_a_slot_never_verified_takes_the_deepest_verified_estimate_until_it_is_verified():
    """At the prior, a slot past those ever verified would never be verified (its estimate learns only from verified
    outcomes): a copy accepted to the end of what was verified would keep ending there."""
    acc = LookupAcceptance(2, 4, ema=0.5)
    for _ in range(3):
        acc.observe(torch.tensor([2]), torch.tensor([2]), torch.tensor([2]))  # 2 of 4 verified, both accepted
    assert acc.table[2].tolist() == [0.9375] * 4
    sched = gate_with("lookup", 0.05)
    sched.lookup = acc
    p = Proposal([[1] * 4] * 3, [4] * 3, [2] * 3, torch.device("cpu"))
    assert sched.should_draft(torch.arange(3), p)
    assert sched.lengths(torch.arange(3), torch.zeros(3, 4), 0.0).tolist() == [4] * 3  # the whole proposals
    acc.observe(torch.tensor([2]), torch.tensor([4]), torch.tensor([2]))  # slot 3 verified and rejected
    assert acc.table[2, 2] == pytest.approx(0.9375 / 2) and acc.table[2, 3] == acc.table[2, 2]


def test_calibration_pairs_only_the_drafters_fully_verified_rounds():
    """A hybrid generation's confidences are the drafter's rounds only: a lookup round verifying g tokens is not one."""
    from deepspec.decoding.speculative import GenerationResult
    from deepspec.evaluation.harness import fully_verified_rounds

    res = GenerationResult(tokens=[], accepted_per_round=[1, 3, 0, 2], verified_per_round=[2, 2, 0, 2],
                           source_per_round=[MODEL, LOOKUP, PLAIN, MODEL])
    res.confidences, res.drafted_verified = [[0.9, 0.8], [0.7, 0.6]], [2, 2]
    assert fully_verified_rounds(res) == ([[0.9, 0.8], [0.7, 0.6]], [1, 2])


# ----------------------------------------------------------------------------- the eval stage
def test_eval_cli_with_the_hybrid_reports_which_proposer_emitted_what(tiny_target, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from deepspec.export import export_drafter
    from deepspec.training.trainer import build_drafter
    from test_online_and_export import DRAFTER, train_cfg

    repo = Path(__file__).resolve().parents[1]
    cfg = train_cfg(tiny_target, [], DRAFTER["dspark"], cache_dir="unused")
    export = export_drafter(build_drafter(cfg, torch.device("cpu"))[0], tmp_path / "export", include_frozen=False, target=cfg.target)
    run = tmp_path / "eval"
    env = {**os.environ, "DEEPSPEC_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, str(repo / "eval" / "eval.py"), f"target.name_or_path={tiny_target}", "target.layer_ids=[-1,1,3]",
                    "target.mask_token_id=3", f"drafter_path={export}", f"run_dir={run}", "max_new_tokens=24", "peers=false",
                    "schedule.policy=hybrid", "schedule.draft_margin=0", "serving_loads=[1]", "sps_max_tokens=4",
                    "datasets=[{name:copy,path:deepspec/assets/eval_prompts/copy_edit.jsonl,max_prompts:2}]"],
                   check=True, cwd=repo, env=env, capture_output=True)
    entry = json.loads((run / "results.json").read_text())["datasets"]["copy"]
    assert entry["greedy"]["greedy_identical_to_plain"] is True
    for mode in ("sampled", "greedy"):
        shares = entry[mode]["token_sources"]
        assert set(shares) == {"lookup", "drafter", "target"} and abs(sum(shares.values()) - 1) < 1e-9
