"""How many drafts each row verifies: DSpark's Algorithm 1 on a cost model of this machine.

A round costs ``t_draft + t_verify(R, W)``: R rows verify W = 1 + L tokens each in one target
forward (the batch is padded to the longest row, so the forward's cost depends on R and W; the
profile measures exactly that). Row r's drafts have calibrated per-slot confidences c_{r,j}; its
predicted survival a_{r,j} = prod_{i<=j} c_{r,i} (``deepspec.calibration``) is the expected number
of tokens slot j adds. Algorithm 1 (paper):

    tau* = R, Theta = tau* / cost(anchors only)
    admit slots in order of a, highest first; after each admission
        Theta' = (tau* + a) / cost(...);  stop at the first that does not raise Theta
    (early stop: a never grows along a row, so admissions stay prefixes and decoding stays exact)

In a padded forward the unit of cost is a column (slot j of every row), so the engine admits
columns (``choose_lengths``: a column adds sum_r a_{r,j}); ``prefix_schedule`` is the per-token
form for engines that pack ragged rows (cost by total tokens B), used by the serving simulation.
A slot whose survival is 0 is never verified.

Policies (``ScheduleConfig.policy``):
    fixed                       draft every round, verify ``fixed_length`` (default: all g)
    threshold                   verify each row's leading drafts with survival >= ``threshold`` (static)
    scheduled                   Algorithm 1 with the verify cost only (the paper)
    scheduled_with_draft_cost   Algorithm 1 with the round's draft cost added, and a gate (``DraftGate``)
                                that decodes plainly unless a drafted round is predicted to emit
                                ``draft_margin`` more tokens per second than a plain step (observed
                                acceptance, measured draft time, profiled verify cost, all per load);
                                it re-probes on a budget of wall time (``probe_budget``, a probe's
                                predicted catch-up paid in advance), never when even full
                                acceptance could not pay.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from deepspec.calibration import apply_temperatures, cumulative_survival
from deepspec.config.decoding import ScheduleConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- Algorithm 1
def choose_lengths(survival: torch.Tensor, verify_seconds: Callable[[int], float], draft_seconds: float = 0.0) -> torch.Tensor:
    """Algorithm 1 over columns. survival (R, g) a_{r,j}; verify_seconds(W) for W tokens per row -> lengths (R,).

    Column j adds sum_r a_{r,j} expected tokens and makes the forward W = j + 1 wide. Stop at the first
    column that does not raise Theta = tau* / (draft_seconds + verify_seconds(W)).
    """
    R, g = survival.shape
    tau, width = float(R), 1
    theta = tau / (draft_seconds + verify_seconds(1))
    for j in range(1, g + 1):
        gain = float(survival[:, j - 1].sum())
        new_theta = (tau + gain) / (draft_seconds + verify_seconds(j + 1))
        if gain <= 0 or new_theta <= theta:  # the first column that lowers expected throughput ends the search
            break
        tau, theta, width = tau + gain, new_theta, j + 1
    positive = (survival > 0).int().cumprod(1).sum(1)  # never verify a slot whose survival is 0
    return positive.clamp(max=width - 1)


def prefix_schedule(conf: torch.Tensor, sps: Callable[[int], float]) -> list[int]:
    """Algorithm 1 per token (packed verification). conf (R, g) per-slot confidences, sps(B) steps/s at B
    verified tokens -> drafts to verify per request (0..g)."""
    R, g = conf.shape
    survive = cumulative_survival(conf)  # a_{r,j}
    order = sorted(((float(survive[r, j]), -j, r, j) for r in range(R) for j in range(g)), reverse=True)
    lengths = [0] * R
    B, tau = R, float(R)
    for a, _, r, j in order:
        if j != lengths[r]:  # not the next slot of this request (a tie placed a later slot first)
            continue
        if a <= 0 or (tau + a) * sps(B + 1) <= tau * sps(B):
            break
        B, tau, lengths[r] = B + 1, tau + a, j + 1
    return lengths


# ----------------------------------------------------------------------------- cost model
@dataclass
class VerifyCostModel:
    """Seconds of one target verify forward of R rows x W tokens, profiled on this machine."""

    rows: list[int]
    widths: list[int]
    seconds: list[list[float]]  # [i][j]: rows[i] x widths[j]
    key: dict

    def __post_init__(self):
        """Make the table monotone: a forward of fewer rows or tokens never costs more than a larger one.

        A stall during profiling (another process taking the cores) shows up as a small forward
        that "costs" 30x a bigger one; the engine would then believe a plain step is slow and draft
        when it should not. Each entry becomes the minimum over the entries at least as large (the
        larger forward bounds it), which also repairs a profile cached before this rule.
        """
        t = [list(line) for line in self.seconds]
        for i in reversed(range(len(t))):
            for j in reversed(range(len(t[i]))):
                if i + 1 < len(t):
                    t[i][j] = min(t[i][j], t[i + 1][j])
                if j + 1 < len(t[i]):
                    t[i][j] = min(t[i][j], t[i][j + 1])
        self.seconds = t
        self._memo: dict[tuple[int, int], float] = {}  # the engine asks for the same few (R, W) every round

    def __call__(self, R: int, W: int) -> float:
        """Interpolated linearly in R (extrapolated beyond the largest profiled R); W clamped to the profile."""
        if (R, W) not in self._memo:
            self._memo[R, W] = self._interpolate(R, W)
        return self._memo[R, W]

    def _interpolate(self, R: int, W: int) -> float:
        j = min(max(W, self.widths[0]), self.widths[-1]) - self.widths[0]
        col = [s[j] for s in self.seconds]
        if R <= self.rows[0]:
            return col[0]
        for i in range(1, len(self.rows)):
            if R <= self.rows[i]:
                f = (R - self.rows[i - 1]) / (self.rows[i] - self.rows[i - 1])
                return col[i - 1] + f * (col[i] - col[i - 1])
        return col[-1] * R / self.rows[-1]

    @classmethod
    @torch.no_grad()
    def profile(cls, target, max_rows: int, max_width: int, context: int = 128, repeats: int = 3) -> "VerifyCostModel":
        """Time target forwards of R x W new tokens after ``context`` cached ones (R = 1, 2, 4, ... max_rows)."""
        from deepspec.decoding.target_cache import TargetCache

        dev = target.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        rows = sorted({min(2 ** i, max_rows) for i in range(max_rows.bit_length() + 1)})
        widths = list(range(1, max_width + 1))
        table = []
        for R in rows:
            cache = TargetCache(target.config)
            target(torch.zeros(R, context, dtype=torch.long, device=dev), past_key_values=cache)
            cache.record(max_width)  # a hybrid target's verify pays for its per-position states, as in the engine
            nothing_kept = torch.zeros(R, dtype=torch.long, device=dev)
            line = []
            for W in widths:
                best = float("inf")
                for _ in range(repeats):
                    sync()
                    t = time.perf_counter()
                    target(torch.ones(R, W, dtype=torch.long, device=dev), past_key_values=cache)
                    cache.keep_prefix(nothing_kept)  # the rollback is part of a round's verify cost
                    sync()
                    best = min(best, time.perf_counter() - t)
                    cache.drop_slots(W)
                line.append(best)
            table.append(line)
        return cls(rows, widths, table, cost_key(target, context))

    @classmethod
    def load_or_profile(cls, target, max_rows: int, max_width: int, cache_dir: str | None = None) -> "VerifyCostModel":
        """The whole grid (rows 1, 2, 4, .. max_rows x widths 1..max_width) of this target on this device/dtype/thread
        count: the points this machine's profile holds, the missing ones measured now, each kept as it is measured
        (``deepspec.decoding.verify_cost``: how a point measured on a busy CPU is kept from misleading later runs).
        A run that needs only part of the grid reads a ``VerifyCostProfile`` instead."""
        from deepspec.decoding.verify_cost import VerifyCostProfile  # it imports this module's cost_key

        profile = VerifyCostProfile.open(target, cache_dir)
        rows = sorted({min(2 ** i, max_rows) for i in range(max_rows.bit_length() + 1)})
        widths = list(range(1, max_width + 1))
        t = time.perf_counter()
        table = [[profile.point(R, W) for W in widths] for R in rows]
        if profile.measured_now:
            log.info("measured %d verify-cost points (rows <= %d, width <= %d) in %.1f s -> %s", len(profile.measured_now),
                     max_rows, max_width, time.perf_counter() - t, profile.path)
        return cls(rows, widths, table, profile.key)


def cpu_is_contended(device: torch.device) -> bool:
    """Other processes want the cores: CPU timings taken now are pessimistic. The 1-minute load average counts this
    process's own threads too (up to one per core while it works), so the bar is 1.5x the cores."""
    return device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1)


def cost_key(target, context: int) -> dict:
    """What a cost profile depends on: the target's config, device, dtype, threads, torch version."""
    from deepspec.target import config_sha256

    dev = target.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu:{os.cpu_count()}"
    return {"config": config_sha256(target.config), "device": name, "dtype": str(next(target.model.parameters()).dtype),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "context": context}


# ----------------------------------------------------------------------------- the runtime scheduler
def best_rate(R: int, column_gains: list[float], verify_seconds: Callable[[int], float], draft_seconds: float) -> float:
    """Expected tokens per second of the best verification width for R rows:
    max_W (R + sum_{j<W} gain_j) / (t_draft + t_verify(W)), gain_j = sum_r a_{r,j} (expected drafts accepted in column j).
    Plain Python: it runs every round, on g + 1 numbers."""
    tokens, best = float(R), R / (draft_seconds + verify_seconds(1))
    for W, gain in enumerate(column_gains, start=2):
        tokens += gain
        best = max(best, tokens / (draft_seconds + verify_seconds(W)))
    return best


class RecentMedian:
    """The median of the last ``window`` observations (``default`` before any): one stalled round on a
    shared machine (a 5x outlier) must not flip a decision that an exponential average would follow."""

    def __init__(self, default: float, window: int = 9):
        self.value, self.window, self.recent = default, window, deque(maxlen=window)

    def __len__(self) -> int:
        return len(self.recent)

    def add(self, x: float) -> None:
        self.recent.append(x)
        self.value = sorted(self.recent)[len(self.recent) // 2]


def nearest(by_key: dict, key: int):
    """The entry of the nearest measured key (rows or load bucket): what an unmeasured one borrows.
    The key's own entry, once measured, is found without a search (this runs several times a round)."""
    if key in by_key:
        return by_key[key]
    return by_key[min(by_key, key=lambda k: abs(k - key))]


class DraftGate:
    """Whether to draft at all this round (scheduled_with_draft_cost): a round costs draft + verify.

    Drafting runs when the predicted rate of a drafted round beats a plain step's by ``margin``. Both
    predictions come from measurements, not from the confidences: the rows' *observed* acceptance per
    slot (an EMA of verification outcomes, so a miscalibrated confidence cannot talk the engine into
    losing), the measured draft time and the profiled verify cost, each arm scaled by the ratio of
    its measured round time to its predicted one (the loop's own overhead, the sampling and any
    error of the profile are paid per round and differ between the arms). Measurements enter as
    medians of the recent rounds (``RecentMedian``): a stall must not make the engine draft.

    Two biases are corrected on top. (1) The tokens: the gate drafts exactly when the acceptance
    estimate is high, and an estimate selected at its highs overstates what follows (a row's EMA
    after one lucky round); the drafts a drafted round really had accepted over those its estimate
    promised (sums over the recent rounds drafted because they were predicted to win) scales the
    predicted gains. (2) The round times: a median of 9 noisy rounds (+-15-30% on a shared VM) is
    itself uncertain by a few percent, so drafting must win by ``margin``; at break-even the plain
    step is the safe side (it is the baseline's own step).

    Everything is kept per load (R in 1, 2-3, 4-7, ...): a profile's error depends on R (longer
    prompts than the profile's at 32 rows; a profile measured while another process had the cores),
    so a ratio learnt at 2 rows cannot correct 32. The first rounds at a load whose plain step was
    never timed are plain (cheap: they cost what plain decoding costs). A load where the drafted arm
    was never timed borrows the nearest load's ratios for its prediction, but drafting there is a
    probe, charged to the budget: its first drafted round (a catch-up, below) and the next, steady
    one, which times the drafted arm at that load; after that the load's own measurements decide.
    The plain arm needs ``plain_samples`` timed observations at a load first: the engine's first step is cold.
    The scheduler hands plain rounds over in streaks (``ScheduleConfig.plain_streak``): one observation is
    a streak's rounds, summed (its medians are over streaks, which only makes them steadier).

    Costs are learnt from *steady* drafted rounds only (the previous round drafted too). The first
    drafted round after plain rounds also pays the drafter's catch-up: the context of every token it
    skipped, for every row (a whole prompt at the start of a generation), which can be several plain
    steps at 16 rows. That is a one-off cost of switching, not what drafting costs per round, so it
    would make a drafted round look slower than it is; it is charged to the probe budget instead.

    While plain decoding wins, the gate still probes with a drafted round now and then (text gets
    easier), on a budget: a losing probe's extra seconds (its round time, catch-up included, minus
    what a plain step would have taken for the tokens it produced) are a debt, each plain round
    repays ``budget`` of its own time, and the next probe waits until the debt is paid. So probing
    costs at most ``budget`` of the wall time (plus one measurement per load), whatever the load, and
    the state carries over from one generation to the next (whether drafting pays is mostly a
    property of the target, the drafter, the machine and the load). It never drafts when even an
    always-accepted draft could not beat a plain step.

    Such a probe, drafting while plain is predicted to win, is also paid in advance: its catch-up grows
    with the rows and their queued context (``catch_up``: N x the longest queue; 24 rows of 1,250-token
    prompts cost ~20 plain steps), so it waits until plain time has repaid, beyond the debt, the loss
    it is predicted to make: its catch-up tokens x the loss per catch-up token of recent switches
    (drafted rounds after plain ones). Else one probe at a new load costs more than the minutes of
    serving that follow repay. A catch-up that grows faster than ``budget`` of the plain time (long
    contexts, many rows, a slow drafter) is never prepaid: probing stops, as the budget says it must.
    The measuring probe of a load predicted to win is not prepaid (the prediction says it pays back), but it
    waits for the debt like any probe, the very first one included: a probe whose steady round never came (the
    rows finished, or another proposer took the next round) measured nothing, and repeating it for free cost a
    catch-up each time (the hybrid at 1 copy_edit row: 29 catch-up rounds, 16% of its decoding time).
    """

    plain_samples = 3  # plain observations timed at a load before drafting there: the engine's very first step is cold
    # (4-5x a warm one on CPU), and a plain arm timed once at 5x would make drafting "win" for good: while the
    # gate drafts, nothing times a plain step again

    def __init__(self, budget: float, margin: float = 0.0, window: int = 9, token_window: int = 64):
        self.budget, self.margin, self.window = budget, margin, window
        self.draft_seconds: dict[int, RecentMedian] = {}  # measured (steady) draft time by number of rows
        self.slowdown: dict[bool, dict[int, RecentMedian]] = {True: {}, False: {}}  # measured / predicted round, by load
        # (drafts accepted, drafts the estimate promised) of recent rounds drafted to win, by load
        self.accepted: dict[int, deque[tuple[float, float]]] = {}
        self.token_window = token_window
        self.debt, self.probing = 0.0, False
        # seconds lost per catch-up token by recent switches to drafting; plain time prepays the next probe's predicted
        # loss (``credit``: the debt goes down to -credit); the catch-up tokens of the switch being decided
        self.catch_up_loss = RecentMedian(0.0, window)
        self.credit, self._catch_up = 0.0, 0
        # the drafted arm's predicted rates (before the slowdown ratio) depend only on what a drafted round changes:
        # plain rounds (most of them, when drafting loses) reuse them: (key, (all accepted, expected))
        self._drafted_rates: tuple[tuple, tuple[float, float]] | None = None

    def draft_cost(self, R: int) -> float:
        if not self.draft_seconds:
            return 0.0
        return nearest(self.draft_seconds, R).value

    def plain_timed(self, R: int) -> bool:
        """Whether ``plain_samples`` plain steps were timed at R's load (before that, every round there is plain)."""
        return len(self.slowdown[False].get(R.bit_length(), ())) >= self.plain_samples

    def ratio(self, drafted: bool, R: int) -> float:
        """Measured / predicted round seconds of an arm at load R (its nearest measured load; 1 before any)."""
        by_load, load = self.slowdown[drafted], R.bit_length()
        if not by_load:
            return 1.0
        return nearest(by_load, load).value

    def plain_seconds(self, R: int, cost: VerifyCostModel) -> float:
        """Predicted seconds of a plain step of R rows."""
        return cost(R, 1) * self.ratio(False, R)

    def loss_over_plain(self, R: int, tokens: int, seconds: float, cost: VerifyCostModel) -> float:
        """A probing round's seconds beyond what plain steps of R rows would have taken for its ``tokens``."""
        return max(seconds - tokens * self.plain_seconds(R, cost) / R, 0.0)

    def acceptance_ratio(self, R: int, prior: float = 2.0) -> float:
        """Drafts accepted / drafts promised by the estimate, in recent rounds drafted to win (nearest load), with
        ``prior`` drafts promised and accepted added to both sums: one unlucky round must not make it 0, which no
        later round could change (a load where drafting never "wins" records nothing more)."""
        if not self.accepted:
            return 1.0
        recent = nearest(self.accepted, R.bit_length())
        return (prior + sum(a for a, _ in recent)) / (prior + sum(e for _, e in recent))

    def should_draft(self, R: int, column_gains: list[float], cost: VerifyCostModel, steady: bool = False,
                     catch_up: Callable[[], int] | None = None) -> bool:
        """R rows whose observed survival sums to ``column_gains`` per slot (g numbers: sum_r a_{r,j});
        ``steady``: the last round drafted (so this one would time the drafted arm without a catch-up);
        ``catch_up``: the tokens the drafter would catch up first (asked only when switching to drafting)."""
        self.probing = False
        load = R.bit_length()
        if not self.plain_timed(R):
            return False  # time plain steps at a new load first (they cost what plain decoding costs)
        plain = R / self.plain_seconds(R, cost)
        # a drafted round does a plain step's work and more, on the same machine: it is never predicted cheaper,
        # relative to the profile, than a plain step (else a burst of contention timed by the plain arm alone, its
        # last 9 rounds, makes a round that accepts nothing "beat" plain)
        slowdown = max(self.ratio(True, R), self.ratio(False, R))
        every_accepted, expected = self.drafted_rates(R, column_gains, cost)
        if every_accepted / slowdown <= plain:
            return False  # drafting cannot pay even if every draft were accepted
        switch = lambda: 0 if steady or catch_up is None else catch_up()  # noqa: E731
        if expected / slowdown > plain * (1 + self.margin):
            if load in self.slowdown[True]:
                self._catch_up = switch()
                return True
            # the measuring probe of a new load: its catch-up round once the last probes are paid for (an investment
            # the prediction says pays back; the very first draft is measured even at budget 0), then a steady round
            if steady or (self.debt <= 0.0 and (self.budget > 0 or not self.draft_seconds)):
                self.probing, self._catch_up = True, switch()
                return True
            return False
        # plain wins: probe once the last probes are paid for and this one's predicted loss is prepaid (the credit is
        # recounted only once the plain rounds have repaid the last prediction: the catch-up only grows meanwhile)
        if self.budget <= 0 or self.debt > -self.credit:
            return False
        self._catch_up = switch()
        self.credit = self.catch_up_loss.value * self._catch_up
        self.probing = self.debt <= -self.credit
        return self.probing

    def drafted_rates(self, R: int, column_gains: list[float], cost: VerifyCostModel) -> tuple[float, float]:
        """Predicted tokens/s of a drafted round of R rows at the profile's cost (before the slowdown ratio): if
        every draft were accepted, and with the gains scaled by the acceptance ratio. Their inputs change only
        after a drafted round, so a run of plain rounds computes them once."""
        draft, k = self.draft_cost(R), self.acceptance_ratio(R)
        key = (R, tuple(column_gains), cost, draft, k)  # cost: compared by identity first
        if self._drafted_rates is None or self._drafted_rates[0] != key:
            verify = lambda W: cost(R, W)  # noqa: E731
            self._drafted_rates = key, (best_rate(R, [float(R)] * len(column_gains), verify, draft),
                                        best_rate(R, [k * gain for gain in column_gains], verify, draft))
        return self._drafted_rates[1]

    def observe_draft(self, R: int, seconds: float, steady: bool = True) -> None:
        """A draft's seconds; ``steady``: the previous round drafted too (no catch-up beyond one round's tokens)."""
        if steady:
            self.draft_seconds.setdefault(R, RecentMedian(seconds, self.window)).add(seconds)

    def observe_round(self, R: int, drafted: bool, width: int, tokens: int, seconds: float, cost: VerifyCostModel,
                      steady: bool = True, promised: float | None = None, rounds: int = 1) -> None:
        """A whole round's wall time (draft, verify, acceptance, bookkeeping) and the tokens it produced;
        ``promised``: the drafts the acceptance estimate expected to be accepted within the verified lengths.
        A plain streak is observed once: ``rounds`` plain rounds, their summed ``seconds`` and ``tokens``."""
        if drafted:  # priced before this round updates the plain arm's estimate
            loss = self.loss_over_plain(R, tokens, seconds, cost)
            if self.probing:
                self.debt += loss
            if not steady and self._catch_up:  # a switch: what its catch-up lost per token
                self.catch_up_loss.add(loss / self._catch_up)
        else:
            self.debt = max(self.debt - self.budget * seconds, -self.credit)
        if drafted and not self.probing and promised is not None:  # a round drafted because it was predicted to win
            self.accepted.setdefault(R.bit_length(), deque(maxlen=self.token_window)).append((tokens - R, promised))
        if steady or not drafted:
            predicted = rounds * (cost(R, width) + (self.draft_cost(R) if drafted else 0.0))
            by_load = self.slowdown[drafted]
            if R.bit_length() not in by_load:
                by_load[R.bit_length()] = RecentMedian(1.0, self.window)
            by_load[R.bit_length()].add(seconds / predicted)


class VerifyScheduler:
    """Per generation: decides each round whether to draft and how many drafts each row verifies."""

    def __init__(self, cfg: ScheduleConfig, block_size: int, cost: VerifyCostModel | None = None,
                 temperatures: list[float] | None = None):
        problems = cfg.problems("schedule.")
        if cfg.policy in ("scheduled", "scheduled_with_draft_cost") and cost is None:
            problems.append(f"schedule.policy={cfg.policy} needs a verify cost model (VerifyCostModel.load_or_profile)")
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.g, self.cost = cfg, block_size, cost
        self.temperatures = cfg.temperatures if cfg.temperatures is not None else temperatures
        self.gate = DraftGate(cfg.probe_budget, cfg.draft_margin) if cfg.policy == "scheduled_with_draft_cost" else None
        self.prior = torch.full((block_size,), 0.5, dtype=torch.float64)  # conditional acceptance per slot, all rows so far
        self._streak = (0, 0, 0.0)  # the current plain streak: (rows, rounds run, their seconds)
        self.start(1)

    def start(self, batch_size: int, catch_up: Callable[[torch.Tensor], int] | None = None) -> None:
        """A new generation of ``batch_size`` rows: each row's acceptance estimate starts from what earlier
        generations observed (the measured costs and the gate's backoff are kept too). ``catch_up``: the session's
        ``catch_up_tokens`` (rows -> the positions its next draft of them catches up first), for the gate's probes."""
        self.catch_up = catch_up or (lambda rows: 0)
        self.online = self.prior.expand(batch_size, -1).clone()  # conditional acceptance per row and slot
        self._gains: tuple[int, list[float]] | None = None  # (rows, sum_r a_{r,j}) until ``online`` changes
        self._steady = False  # the last round drafted: the next draft catches up one round's tokens, not a prompt
        self._end_streak()  # a streak left by the last generation's final rounds is still an observation
        self._plain_left = 0  # plain rounds still to run without asking the gate

    def _end_streak(self) -> None:
        """Hand the gate the plain streak's rounds as one observation (rows, rounds, summed seconds)."""
        R, rounds, seconds = self._streak
        if rounds:
            self.gate.observe_round(R, False, 1, R * rounds, seconds, self.cost, rounds=rounds)
        self._streak = (0, 0, 0.0)

    def _join_streak(self, R: int, seconds: float, last: bool) -> None:
        """A plain round of R rows joins the current streak (a new one at a new load); ``last``: hand it over now."""
        if self._streak[0] != R:
            self._end_streak()
        _, rounds, total = self._streak
        self._streak = (R, rounds + 1, total + seconds)
        if last:
            self._end_streak()

    def wants_proposal(self, rows: torch.Tensor) -> bool:
        """0. whether the round may read a training-free proposer's proposals (``decoding.hybrid``): never here."""
        return False

    def should_draft(self, rows: torch.Tensor, proposal=None) -> bool:
        """1. before drafting: False = decode this round plainly (scheduled_with_draft_cost only). ``proposal``: the
        round's lookup proposals (``sessions.lookup``), read by the lookup policies (``decoding.hybrid``).

        The observed survival changes only after a drafted round (or when a row finishes), so a run of
        plain rounds reuses its column sums: a plain round's bookkeeping stays plain Python."""
        if self.gate is None:
            return True
        R = len(rows)  # rows only ever leave: their count names the set
        if self._plain_left and R == self._streak[0]:  # inside a plain streak: no gate work at all
            self._plain_left -= 1
            return False
        self._end_streak()
        if self._gains is None or self._gains[0] != R:
            self._gains = R, cumulative_survival(self.online[rows.cpu()]).sum(0).tolist()
        if self.gate.should_draft(R, self._gains[1], self.cost, self._steady, lambda: self.catch_up(rows)):
            return True
        self._plain_left, self._streak = self.cfg.plain_streak - 1, (R, 0, 0.0)
        return False

    def survival(self, rows: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """Calibrated cumulative survival a (N, g) of the rows' drafts."""
        if self.cfg.confidence == "online":
            return cumulative_survival(self.online[rows.cpu()])
        return cumulative_survival(apply_temperatures(confidence.detach().cpu(), self.temperatures))

    def lengths(self, rows: torch.Tensor, confidence: torch.Tensor, draft_seconds: float) -> torch.Tensor:
        """2. drafts verified per row (N,), on the rows' device."""
        N = len(rows)
        if self.gate is not None:
            self.gate.observe_draft(N, draft_seconds, self._steady)
        if self.cfg.policy == "fixed":
            L = self.cfg.fixed_length or self.g
            return torch.full((N,), min(L, self.g), dtype=torch.long, device=rows.device)
        if self.cfg.policy == "threshold":
            survival = self.survival(rows, confidence)
            return (survival >= self.cfg.threshold).int().cumprod(1).sum(1).to(rows.device)
        extra = draft_seconds if self.cfg.policy == "scheduled_with_draft_cost" else 0.0
        return choose_lengths(self.survival(rows, confidence), lambda W: self.cost(N, W), extra).to(rows.device)

    def observe(self, rows: torch.Tensor, verified: torch.Tensor | None, accepted: torch.Tensor | None,
                seconds: float) -> None:
        """3. after a round of ``seconds`` (verified/accepted (N,) per row; None after a plain step): the gate
        compares it with its prediction; after a drafted round the online acceptance estimate (read by the
        gate and by ``confidence=online``) learns from what was verified."""
        drafted = verified is not None
        if self.gate is not None and not drafted:  # a round of the plain streak: summed, observed when it ends
            self._join_streak(len(rows), seconds, last=not self._plain_left)
        elif self.gate is not None:
            self._plain_left = 0  # a drafted round ends any streak (the loop drafts only when asked; callers may not)
            self._end_streak()
            width, tokens = 1 + int(verified.max()), len(rows) + int(accepted.sum())
            a = cumulative_survival(self.online[rows.cpu()])  # the estimate the gate decided on (before this round)
            promised = float((a * (torch.arange(self.g) < verified.cpu()[:, None])).sum())
            self.gate.observe_round(len(rows), drafted, width, tokens, seconds, self.cost, self._steady, promised)
        self._steady = drafted
        if not drafted or (self.gate is None and self.cfg.confidence != "online"):
            return
        self._gains = None
        self._learn(rows.cpu(), verified.cpu(), accepted.cpu())

    def _learn(self, r: torch.Tensor, L: torch.Tensor, m: torch.Tensor) -> None:
        """The online acceptance per row and slot, and the prior over rows, from drafted rows r (M,) that verified L
        and accepted m (M,) each (host tensors)."""
        k = torch.arange(self.g)
        seen = k[None] <= torch.minimum(m, L - 1)[:, None]  # slot k+1 verified with all earlier ones accepted
        hit = (k[None] < m[:, None]).double()
        ema = self.cfg.online_ema
        cur = self.online[r]
        self.online[r] = torch.where(seen, ema * hit + (1 - ema) * cur, cur)
        n = seen.sum(0)
        slot_mean = (hit * seen).sum(0) / n.clamp_min(1)
        weight = 1 - (1 - ema / 4) ** n.double()  # the prior moves slower than a row: it averages over rows
        self.prior = torch.where(n > 0, weight * slot_mean + (1 - weight) * self.prior, self.prior)
