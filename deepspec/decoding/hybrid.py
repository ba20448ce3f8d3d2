"""Each row's source per round: a plain step, the lookup's proposal or the drafter's block, by predicted tokens/s.

Policies (``ScheduleConfig.policy``), all on the verify-cost profile and the measured round times of
``scheduler.DraftGate``:

    lookup       the training-free proposer alone (``sessions.lookup``): a round verifies the rows' proposals
                 when the lookup's predicted rate beats a plain step's by ``draft_margin``, else it is plain (or a
                 probe: below)
    hybrid       per row the source with more expected accepted drafts (the lookup's estimate by match length,
                 the drafter's online acceptance), and per round the best of three arms:
                     plain         R / t_plain(R)
                     lookup        max_W (R + sum_{j<W} sum_r a^lookup_{r,j}) / t_verify(R, W)
                     drafter       the same with each row's better source and the draft's cost (DraftGate, which
                                   also probes on its budget while plain wins, every row drafting; no probe
                                   starts while the lookup wins, but a probe's second, steady round, which
                                   times the drafted arm, is not pre-empted)
                 each arm's prediction scaled by its measured / predicted round time at this load
    lookup_rule  Arctic's fixed rule, no cost model for the choice: a row takes the lookup's proposal when it is
                 at least the drafter's block long (and verifies all of it), else the drafter, under the
                 draft-cost gate; a row with a shorter match and no drafted round is plain

Once sources are fixed, every row's verified length comes from Algorithm 1 over one survival matrix (lookup rows:
the estimate by match length; drafter rows: their calibrated confidences; plain rows: 0), so rows of different
sources share one verify pass. A proposal is a function of the context alone, so choosing sources and lengths from
it keeps decoding exact. A round that is plain whatever the proposals are (the drafter's gate says plain, no lookup
round could beat a plain step even at the estimate's best match length, and the lookup may not probe) asks for none
(``wants_proposal``): no matching, and the round's tokens wait in the lookup's queue, so a plain round of the hybrid
costs about what the drafter's gate alone costs.

The lookup's acceptance estimate (``LookupAcceptance``) is conditional acceptance per (match length n, slot),
pooled over rows and generations, an EMA of verified outcomes (``lookup_ema``); a slot never verified takes the deepest
verified slot's estimate (else nothing would ever verify it). It learns only from rounds that
verify lookup proposals, so an estimate that fell after a few misses would keep the lookup off for good (the text
may turn into a copy later). While a round would be plain and some row has a match, the lookup probes on the
drafter gate's terms (``probe_budget``): its matched rows verify at least one proposed token; a probe's seconds
beyond what a plain step would have taken for its tokens are a debt, each plain round repays ``probe_budget`` of
its time, and the next probe waits until the debt is paid. A probe verifying one token costs t(R, 2) - t(R, 1)
at most (a few % of a step on the CPU), so the lookup re-checks every few tens of plain rounds.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from deepspec.calibration import cumulative_survival
from deepspec.config.decoding import ScheduleConfig
from deepspec.decoding.scheduler import RecentMedian, VerifyCostModel, VerifyScheduler, best_rate, choose_lengths, nearest
from deepspec.decoding.sessions import make_session
from deepspec.decoding.sessions.lookup import LOOKUP, MODEL, PLAIN, HybridSession, LookupSession, NgramIndex, Proposal


class LookupAcceptance:
    """P(slot k accepted | slots < k accepted) of lookup proposals, per match length n: (max_n + 1, g) float64.

    A slot never verified at match length n takes the estimate of the deepest slot verified there: a proposal
    accepted that far is a copy that tends to go on. Left at the prior, a slot past the verified ones would keep
    Algorithm 1 from ever verifying it (its estimate learns only from verified outcomes), and whole accepted
    proposals would end early (1 copy_edit row: 4-gram matches' slots 5-8 at 0.99 and 9-10 at the prior, so
    rounds verified 8 of 10 proposed tokens and the lookup ran 7% behind Arctic's rule of verifying them all)."""

    def __init__(self, max_n: int, g: int, ema: float, prior: float = 0.5):
        self.table = torch.full((max_n + 1, g), prior, dtype=torch.float64)  # row 0 (no match) is never read
        self.verified = [0] * (max_n + 1)  # slots ever verified per n (always a prefix; host ints: no tensor ops)
        self.ema, self.g = ema, g
        self._update()

    def _update(self) -> None:
        """Cumulative survival by match length, as host lists: ``column[n]`` = a_{n,.} and ``best_column`` = max_n a_{n,.}
        per slot (the gate reads them every round; they change only when the table learns)."""
        cum = cumulative_survival(self.table)
        self.column = cum.tolist()
        self.best_column = cum[1:].max(0).values.tolist()  # per slot the best match length's: a bound on any row's
        self.version = getattr(self, "version", -1) + 1

    def survival(self, proposal: Proposal) -> torch.Tensor:
        """-> a (N, g): expected survival of each row's proposed slots (0 past its proposal, 0 without a match)."""
        proposed = torch.arange(self.g)[None] < torch.tensor(proposal.length)[:, None]
        return cumulative_survival(self.table[torch.tensor(proposal.score)]) * proposed

    def column_gains(self, proposal: Proposal) -> list[float]:
        """sum_r a_{r,j} per slot j (g floats), in plain Python: the gate's input, every round."""
        gains = [0.0] * self.g
        for n, length in zip(proposal.score, proposal.length):
            if n:
                col = self.column[n]
                for j in range(min(length, self.g)):
                    gains[j] += col[j]
        return gains

    def observe(self, score: torch.Tensor, verified: torch.Tensor, accepted: torch.Tensor) -> None:
        """Rows that verified a lookup proposal: score, verified L, accepted m (M,) each, on the host."""
        k = torch.arange(self.g)
        seen = k[None] <= torch.minimum(accepted, verified - 1)[:, None]  # slot k verified with all earlier accepted
        hit = (k[None] < accepted[:, None]).double()
        for n in score.unique().tolist():
            rows = score == n
            count = seen[rows].sum(0)
            mean = (hit * seen)[rows].sum(0) / count.clamp_min(1)
            weight = 1 - (1 - self.ema) ** count.double()  # k outcomes move the estimate as k EMA steps would
            self.table[n] = torch.where(count > 0, weight * mean + (1 - weight) * self.table[n], self.table[n])
            deepest = max(self.verified[n], int((count > 0).sum()))  # a slot is verified after all before it
            if deepest:
                self.verified[n] = deepest
                self.table[n, deepest:] = self.table[n, deepest - 1]  # the slots never verified: the deepest one's estimate
        self._update()


class HybridScheduler(VerifyScheduler):
    """The lookup policies: per round each row's source (``should_draft``), then Algorithm 1 over all rows."""

    def __init__(self, cfg: ScheduleConfig, block_size: int, cost: VerifyCostModel | None,
                 temperatures: list[float] | None = None):
        if cost is None:
            raise ValueError(f"schedule.policy={cfg.policy} needs a verify cost model (VerifyCostModel.load_or_profile)")
        # the drafter arm is the draft-cost gate's; rounds are decided one by one (a match may come any round)
        super().__init__(replace(cfg, policy="scheduled_with_draft_cost"), block_size, cost, temperatures)
        self.policy, self.cfg = cfg.policy, cfg
        self.G = max(block_size, cfg.lookup_tokens)  # a round's widest proposal: the lookup's may be longer than g
        self.lookup = LookupAcceptance(cfg.lookup_max_ngram, self.G, cfg.lookup_ema)
        self.lookup_slowdown: dict[int, RecentMedian] = {}  # measured / predicted seconds of lookup rounds, by load
        self.shared = NgramIndex(cfg.lookup_min_ngram, cfg.lookup_max_ngram) if cfg.lookup_shared else None
        self._round: tuple[torch.Tensor, torch.Tensor, Proposal] | None = None  # (source (N,), lookup survival (N, g), proposal)
        self._rates: dict[tuple, float] = {}  # lookup_rate's memo
        self.lookup_debt, self._probe = 0.0, False  # the lookup's probe budget (as DraftGate's), this round a probe
        self._bound: tuple[tuple, float] | None = None  # lookup_bound's memo

    def session(self, drafter, batch_size: int, vocab_size: int) -> HybridSession:
        """The session this policy decodes with: the lookup (and, but for ``lookup``, the drafter's session)."""
        model = make_session(drafter, batch_size) if self.policy != "lookup" else None
        c = self.cfg
        return HybridSession(model, LookupSession(batch_size, self.G, c.lookup_min_ngram, c.lookup_max_ngram, vocab_size, self.shared))

    def lookup_ratio(self, R: int) -> float:
        """Measured / predicted seconds of a lookup round at load R: a lookup round does a plain step's work and more."""
        measured = nearest(self.lookup_slowdown, R.bit_length()).value if self.lookup_slowdown else 1.0
        return max(measured, self.gate.ratio(False, R))

    def lookup_rate(self, R: int, proposal: Proposal) -> float:
        """Predicted tokens/s of a lookup round of R rows (its best width), before the slowdown ratio; memoised by the
        proposals' scores and lengths and the estimate's version (plain Python: it runs every round)."""
        key = (R, tuple(proposal.score), tuple(proposal.length), self.lookup.version)
        if key not in self._rates:
            if len(self._rates) > 4096:
                self._rates.clear()
            self._rates[key] = best_rate(R, self.lookup.column_gains(proposal), lambda W: self.cost(R, W), 0.0)
        return self._rates[key]

    def lookup_bound(self, R: int) -> float:
        """The best tokens/s any lookup round of R rows could be predicted (slowdown included): every row matched at
        each slot's best match length, proposing all G tokens. Memoised by the estimate's version."""
        key = (R, self.lookup.version)
        if self._bound is None or self._bound[0] != key:
            self._bound = key, best_rate(R, [R * a for a in self.lookup.best_column], lambda W: self.cost(R, W), 0.0)
        return self._bound[1] / self.lookup_ratio(R)

    def wants_proposal(self, rows: torch.Tensor) -> bool:
        """0a. Whether this round needs the lookup's proposals: False when the round is plain whatever they are (no
        plain step timed at this load yet; or the drafter's gate says plain, no lookup round could beat a plain step
        even at its best estimate, and the lookup may not probe now). The session then skips matching and keeps the
        round's tokens queued (``LookupSession.extend``): a plain round of a streak costs a few comparisons, not a
        match and an index append per row."""
        R = len(rows)
        if not self.gate.plain_timed(R):
            return False
        if self.policy == "lookup_rule" or (self.policy == "hybrid" and self._drafter_gate(rows)):
            return True
        return self._lookup_may_probe() or self.lookup_bound(R) > self._rate_to_beat(R)

    def _rate_to_beat(self, R: int) -> float:
        """The tokens/s a lookup round of R rows must be predicted above: a plain step's, by ``draft_margin``."""
        return R / self.gate.plain_seconds(R, self.cost) * (1 + self.cfg.draft_margin)

    def _lookup_may_probe(self) -> bool:
        """The lookup's probe budget allows a probe now (its last probes repaid)."""
        return self.cfg.probe_budget > 0 and self.lookup_debt <= 0.0

    def _drafter_gate(self, rows: torch.Tensor) -> bool:
        """The drafter arm's gate (``DraftGate.should_draft``), asked once per plain streak once it says plain: its
        inputs change only when it observes (a streak's end, a drafted round: ``_end_streak``), as the parent's
        streaks rely on (there the whole round skips the gate)."""
        R = len(rows)
        if self._gate_says_plain == R:
            return False
        drafts = self.gate.should_draft(R, self._model_gains(rows), self.cost, self._steady, lambda: self.catch_up(rows))
        self._gate_says_plain = None if drafts else R
        return drafts

    def start(self, batch_size: int, catch_up=None) -> None:
        super().start(batch_size, catch_up)
        self._gate_says_plain = None  # a new generation: the rows' acceptance starts over

    def _end_streak(self) -> None:
        if self._streak[1]:
            self._gate_says_plain = None  # the gate observed: ask it again
        super()._end_streak()

    def should_draft(self, rows: torch.Tensor, proposal: Proposal | None = None) -> bool:
        """0b. each row's source (set on ``proposal.source``); False = every row plain (a plain step). ``proposal``:
        None when ``wants_proposal`` said the round is plain.

        The common rounds (plain, or the lookup's) cost a few dict probes and the gate's cached arithmetic: the
        lookup's rate is memoised, the drafter's column gains are the parent's (they change after its rounds only)."""
        R, gate, cost = len(rows), self.gate, self.cost
        self._probe = False
        if proposal is None or not gate.plain_timed(R):
            return False  # time plain steps at a new load first (the engine's first step is cold)
        matched = [n > 0 for n in proposal.score]
        lookup_rate = self.lookup_rate(R, proposal) / self.lookup_ratio(R) if any(matched) else 0.0
        lookup_wins = lookup_rate > self._rate_to_beat(R)
        use_lookup, use_model = (matched if lookup_wins else [False] * R), [False] * R
        if self.policy == "hybrid":
            gains = self._model_gains(rows)
            if self._drafter_gate(rows):  # the drafter beats plain (or probes)
                model_rate = gate.drafted_rates(R, gains, cost)[1] / max(gate.ratio(True, R), gate.ratio(False, R))
                # a probe's steady round (the last round drafted) is the one that times the drafted arm, its catch-up
                # already paid: the lookup does not pre-empt it, or the probe measured nothing and comes back
                timing = gate.probing and self._steady
                if lookup_wins and not timing and (gate.probing or model_rate <= lookup_rate):
                    gate.probing = False  # the lookup wins: no drafted round, no probe
                elif gate.probing:  # plain beats the lookup and the drafter: the drafter's probe, every row drafts
                    use_model = [True] * R  # (a row on the lookup instead would leave the probe unpriced, every round)
                else:  # the drafter wins: each row its source with more expected accepted drafts
                    by_lookup = self._prefer_lookup(rows, proposal)
                    # every row on the lookup is a lookup round, which must win on its own: a drafter round would
                    # expect fewer accepted drafts on these rows (each prefers its match) at a draft's cost more
                    if not all(by_lookup) or lookup_wins:
                        use_lookup, use_model = by_lookup, [not b for b in by_lookup]
        elif self.policy == "lookup_rule":
            use_lookup = [n >= self.g for n in proposal.length]  # Arctic: the suffix draft when it is as long as the drafter's
            if not all(use_lookup):
                if self._drafter_gate(rows):
                    use_model = [not b for b in use_lookup]
        if not (any(use_lookup) or any(use_model)):
            if self.policy == "lookup_rule" or not (any(matched) and self._lookup_may_probe()):
                return False
            use_lookup, self._probe = matched, True  # a plain round: the lookup probes its matched rows instead
        source = torch.tensor([MODEL if m else LOOKUP if lk else PLAIN for lk, m in zip(use_lookup, use_model)])
        proposal.source = source.to(proposal.device)
        self._round = source, self.lookup.survival(proposal), proposal
        return True

    def _model_gains(self, rows: torch.Tensor) -> list[float]:
        """The drafter's column gains for these R rows, memoised until R changes (they change after its rounds only)."""
        if self._gains is None or self._gains[0] != len(rows):
            self._gains = len(rows), cumulative_survival(self.online[rows.cpu()]).sum(0).tolist()
        return self._gains[1]

    def _prefer_lookup(self, rows: torch.Tensor, proposal: Proposal) -> list[bool]:
        """Per row: the lookup's proposal expects at least as many accepted drafts as the drafter's block."""
        lk = self.lookup.survival(proposal).sum(1)
        md = cumulative_survival(self.online[rows.cpu()]).sum(1)
        return [bool(m) and a >= b for m, a, b in zip(proposal.score, lk.tolist(), md.tolist())]

    def lengths(self, rows: torch.Tensor, confidence: torch.Tensor, draft_seconds: float) -> torch.Tensor:
        """2. drafts verified per row (N,): Algorithm 1 over the rows' survival by source, (N, G) (a drafter row's
        slots past its block g survive with 0)."""
        source, lk, proposal = self._round
        N, model = len(rows), source == MODEL
        a = lk * (source == LOOKUP)[:, None]
        if model.any():
            self.gate.observe_draft(N, draft_seconds, self._steady)
            m = model.to(confidence.device)
            a[model, : self.g] = self.survival(rows[model.to(rows.device)], confidence[m][:, : self.g])
        L = choose_lengths(a, lambda W: self.cost(N, W), draft_seconds if model.any() else 0.0)
        if self.policy == "lookup_rule":  # Arctic verifies the whole suffix draft
            L = torch.where(source == LOOKUP, torch.tensor(proposal.length), L)
        elif self._probe:  # a probe verifies at least the first proposed token of each matched row
            L = torch.where(source == LOOKUP, L.clamp_min(1), L)
        return L.to(rows.device)

    def observe(self, rows: torch.Tensor, verified: torch.Tensor | None, accepted: torch.Tensor | None, seconds: float) -> None:
        """3. after a round: the lookup's estimate learns from its rows, the drafter's from its rows; the round's time
        goes to the arm that ran it (a drafted round to the gate, a lookup round to ``lookup_slowdown``)."""
        if verified is None:  # a plain step: both probe budgets, and the gate's plain arm in streaks
            self.lookup_debt = max(self.lookup_debt - self.cfg.probe_budget * seconds, 0.0)
            self._add_plain(len(rows), seconds)
            self._steady = False
            return
        self._end_streak()
        source, lk, proposal = self._round
        L, m, R = verified.cpu(), accepted.cpu(), len(rows)
        if self._probe:
            self.lookup_debt += self.gate.loss_over_plain(R, R + int(m.sum()), seconds, self.cost)
        mine = (source == LOOKUP) & (L > 0)
        if mine.any():
            self.lookup.observe(torch.tensor(proposal.score)[mine], L[mine], m[mine])
        width, tokens = 1 + int(L.max()), R + int(m.sum())
        model = source == MODEL
        if model.any():  # the gate observes a drafted round (a lookup round changes none of its inputs: it is asked
            self._gate_says_plain = None  # again after drafted rounds and plain streaks only)
            md = torch.nn.functional.pad(cumulative_survival(self.online[rows.cpu()]), (0, self.G - self.g))
            promised = float((torch.where(model[:, None], md, lk) * (torch.arange(self.G) < L[:, None])).sum())
            self.gate.observe_round(R, True, width, tokens, seconds, self.cost, self._steady, promised)
            self._learn(rows.cpu()[model], L[model], m[model])
            self._gains = None
        else:
            self.lookup_slowdown.setdefault(R.bit_length(), RecentMedian(1.0, self.gate.window)).add(seconds / self.cost(R, width))
        self._steady = bool(model.any())  # the drafter's next draft catches up one round, not a lookup streak


    def _add_plain(self, R: int, seconds: float) -> None:
        """A plain round joins the current streak, which the gate observes as one (``_end_streak``) every ``plain_streak``
        rounds, at a change of load or before any other round: its arithmetic once per streak, not every round (unlike
        the parent's streaks, ``should_draft`` still decides every round: a match may come any round). The first
        ``plain_samples`` rounds at a load are observed one by one (nothing drafts there before them)."""
        rounds = 1 + (self._streak[1] if self._streak[0] == R else 0)  # this streak's rounds, this one included
        few = not self.gate.plain_timed(R)
        self._join_streak(R, seconds, last=rounds >= self.cfg.plain_streak or few)


def make_scheduler(cfg: ScheduleConfig, block_size: int, cost: VerifyCostModel | None,
                   temperatures: list[float] | None = None) -> VerifyScheduler:
    """The scheduler of ``cfg.policy``; ``block_size`` is the drafter's (the lookup alone proposes ``lookup_tokens``)."""
    if cfg.policy == "lookup":
        return HybridScheduler(cfg, cfg.lookup_tokens, cost)
    if cfg.policy in ("hybrid", "lookup_rule"):
        return HybridScheduler(cfg, block_size, cost, temperatures)
    return VerifyScheduler(cfg, block_size, cost, temperatures)


def make_engine_session(scheduler: VerifyScheduler | None, drafter, batch_size: int, vocab_size: int):
    """The session a scheduler decodes with: a lookup policy's hybrid session, else the drafter's own."""
    if isinstance(scheduler, HybridScheduler):
        return scheduler.session(drafter, batch_size, vocab_size)
    return make_session(drafter, batch_size)
