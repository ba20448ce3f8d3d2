"""Speculative decoding is lossless: greedy output = plain greedy output, sampled output is
distributed like the target's (chi-square, with a mutated acceptance rule that must fail)."""
from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import chisquare

from conftest import TOY_PROMPTS
from deepspec.config.data import TargetConfig
from deepspec.config.train import TrainStageConfig
from deepspec.decoding.scheduler import ScheduleConfig, VerifyCostModel, VerifyScheduler
from deepspec.decoding.sessions import Draft, make_session
from deepspec.decoding.speculative import autoregressive_generate, speculative_generate, speculative_generate_batch
from deepspec.decoding.verify import SamplingConfig, sample, verify_block
from deepspec.target import TargetModel, load_tokenizer
from deepspec.training.trainer import build_drafter

TOY = TargetConfig(name_or_path="toy", layer_ids=[0, 2, 4], mask_token_id=3)
DRAFTERS = {"dspark": {"name": "dspark", "block_size": 5, "num_hidden_layers": 1, "markov_rank": 16},
            "dflash": {"name": "dflash", "block_size": 5, "num_hidden_layers": 1},
            "eagle3": {"name": "eagle3", "ttt_steps": 4}}


@pytest.fixture(scope="module")
def toy():
    return TargetModel.from_config(TOY), load_tokenizer(TOY)


def prompts(tok, n: int) -> list[torch.Tensor]:
    rows = [json.loads(l) for l in (TOY_PROMPTS / "heldout.jsonl").read_text().splitlines()[:n]]
    return [tok(tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False, return_tensors="pt").input_ids[0] for r in rows]


@pytest.mark.parametrize("name", ["dspark", "dflash", "eagle3"])
def test_greedy_speculative_equals_plain_greedy(toy, name):
    target, tok = toy
    drafter, _ = build_drafter(TrainStageConfig(target=TOY, drafter=DRAFTERS[name], cache_dir="x"), torch.device("cpu"))
    greedy = SamplingConfig(temperature=0)
    for ids in prompts(tok, 4):
        ref = autoregressive_generate(target, ids, 48, greedy, eos_token_id=tok.eos_token_id)
        got = speculative_generate(target, drafter.eval(), ids, 48, greedy, eos_token_id=tok.eos_token_id)
        assert got.tokens == ref.tokens


class ReplaySession:
    """A drafter that proposes each row's fixed continuation (the target's own), corrupted at chosen
    offsets: exercises always-accept, never-accept and sometimes-accept rounds of the real loop."""

    def __init__(self, continuations: list[list[int]], g: int, corrupt: list[set[int]], prompt_lens: list[int]):
        self.cont, self.block_size, self.corrupt = continuations, g, corrupt
        self.seen = [-n for n in prompt_lens]  # verified tokens after the prompt, per row

    def extend(self, features, tokens, valid):
        for b, n in enumerate(valid.sum(1).tolist()):
            self.seen[b] += n

    def draft(self, rows, anchors, sampling, generator):
        out = []
        for b in rows.tolist():
            start = self.seen[b] + 1  # index of the token after the anchor
            out.append([((self.cont[b][i] if i < len(self.cont[b]) else 0) + (i in self.corrupt[b])) % 4096
                        for i in range(start, start + self.block_size)])
        tokens = torch.tensor(out)
        return Draft(tokens, None, torch.ones(tokens.shape))


@pytest.mark.parametrize("corrupt,expected_tau", [(set(), 5.0), (set(range(100)), 1.0), ({3, 11, 12, 25}, None)])
def test_greedy_loop_with_always_never_sometimes_accepting_drafters(toy, corrupt, expected_tau):
    target, tok = toy
    greedy = SamplingConfig(temperature=0)
    ids = prompts(tok, 1)[0]
    ref = autoregressive_generate(target, ids, 40, greedy).tokens
    session = ReplaySession([ref], g=4, corrupt=[corrupt], prompt_lens=[len(ids)])
    got = speculative_generate(target, session, ids, 40, greedy)
    assert got.tokens == ref
    if expected_tau is not None:
        full_rounds = got.accepted_per_round[:-1]  # the last round may be cut by max_new_tokens
        assert sum(m + 1 for m in full_rounds) / len(full_rounds) == expected_tau
    else:
        assert 1.0 < got.tau < 5.0


# ----------------------------------------------------------------------------- sampling
def _first_token_counts(rule, p, q, trials: int, seed: int = 0) -> torch.Tensor:
    """Emit the first token of a round ``trials`` times (one batch of rows) with ``rule``; count tokens."""
    g = torch.Generator().manual_seed(seed)
    P, Q = p.expand(trials, *p.shape), q.expand(trials, *q.shape)
    drafts = sample(Q, g)  # (trials, g)
    m, nxt = rule(drafts, Q, P, torch.full((trials,), q.shape[0]), g, False)
    first = torch.where(m >= 1, drafts[:, 0], nxt)
    return torch.bincount(first, minlength=p.shape[-1]).float()


def _mutated_rule(draft, q, p, lengths, generator, greedy):
    """verify_block with one line altered: the correction is drawn from p instead of the residual."""
    N, gl = draft.shape
    u = torch.rand(N, gl, generator=generator)
    ratio = p[:, :gl].gather(-1, draft[..., None])[..., 0] / q.gather(-1, draft[..., None])[..., 0]
    m = (u < ratio.clamp(max=1)).int().cumprod(1).sum(1)
    return m, sample(p[torch.arange(N), m], generator)


@pytest.mark.parametrize("verified", [3, 1, 0])
def test_rejection_sampling_emits_the_target_distribution(verified):
    """One round's first emitted token, 200,000 rows at once: exactly p_1 whatever prefix is verified."""
    torch.manual_seed(0)
    V, g = 6, 3
    p = torch.softmax(torch.randn(g + 1, V) * 1.5, -1)
    q = torch.softmax(torch.randn(g, V) * 1.5, -1)
    n = 200_000
    expected = (p[0] * n).numpy()
    rule = lambda *a: verify_block(*a[:3], torch.full((n,), verified), *a[4:])  # noqa: E731
    good = _first_token_counts(rule, p, q, n).numpy()
    assert chisquare(good, expected).pvalue > 1e-4
    if verified:
        bad = _first_token_counts(_mutated_rule, p, q, n).numpy()
        assert chisquare(bad, expected).pvalue < 1e-12  # the test has the power to see a one-line change


@pytest.mark.slow
def test_sampled_speculative_output_matches_target_on_a_tiny_vocabulary(tmp_path):
    """End to end through the real loop: joint law of the first two tokens, speculative vs plain."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    V = 6
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, initializer_range=0.5, tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    tcfg = TargetConfig(name_or_path=str(tmp_path), layer_ids=[0, 1], mask_token_id=5)
    target = TargetModel.from_config(tcfg)
    drafter, _ = build_drafter(TrainStageConfig(target=tcfg, drafter={"name": "dspark", "block_size": 3, "num_hidden_layers": 1,
                                                                      "markov_rank": 4}, cache_dir="x"), torch.device("cpu"))
    for p_ in drafter.parameters():  # a drafter that is neither uniform nor the target
        if p_.requires_grad:
            p_.data.normal_(0, 0.5)
    sampling = SamplingConfig(temperature=1.0)
    prompt = torch.tensor([1, 2, 3])
    n = 1500
    g = torch.Generator().manual_seed(1)
    plain, spec = torch.zeros(V * V), torch.zeros(V * V)
    for _ in range(n):
        a = autoregressive_generate(target, prompt, 2, sampling, generator=g).tokens
        b = speculative_generate(target, drafter.eval(), prompt, 2, sampling, generator=g).tokens
        plain[a[0] * V + a[1]] += 1
        spec[b[0] * V + b[1]] += 1
    keep = (plain + spec) >= 10  # pool rare cells
    table = torch.stack([plain[keep], spec[keep]])
    from scipy.stats import chi2_contingency

    assert chi2_contingency(table.numpy()).pvalue > 1e-3


def costly_verification(R: int = 8, g: int = 8) -> VerifyCostModel:
    """A synthetic cost model where each verified column costs 30% of a step: Algorithm 1 shortens rounds."""
    rows = [1, 2, 4, 8][: R.bit_length()]
    return VerifyCostModel(rows, list(range(1, g + 2)), [[r * (1 + 0.3 * (w - 1)) for w in range(1, g + 2)] for r in rows], {})


@pytest.mark.parametrize("policy", ["scheduled", "scheduled_with_draft_cost"])
def test_scheduled_verification_stays_lossless(toy, policy):
    target, tok = toy
    drafter, _ = build_drafter(TrainStageConfig(target=TOY, drafter=DRAFTERS["dspark"], cache_dir="x"), torch.device("cpu"))
    greedy = SamplingConfig(temperature=0)
    for ids in prompts(tok, 2):
        ref = autoregressive_generate(target, ids, 40, greedy, eos_token_id=tok.eos_token_id)
        sched = VerifyScheduler(ScheduleConfig(policy=policy), 5, costly_verification())
        if sched.gate is not None:  # the synthetic profile is the truth here: the plain step "timed" as predicted
            for _ in range(sched.gate.plain_samples):
                sched.gate.observe_round(1, False, 1, 1, sched.cost(1, 1), sched.cost)
        got = speculative_generate(target, drafter.eval(), ids, 40, greedy, tok.eos_token_id, scheduler=sched)
        assert got.tokens == ref.tokens
        assert min(got.verified_per_round) < 5  # the schedule really shortened rounds


@pytest.mark.parametrize("name", ["dspark", "dflash", "eagle3", "replay"])
def test_batched_greedy_with_ragged_acceptance_equals_plain_greedy(toy, name):
    target, tok = toy
    greedy = SamplingConfig(temperature=0)
    ids = prompts(tok, 4)  # different prompt lengths: left padding
    eos = None if name == "replay" else tok.eos_token_id  # replay rows run the full length: many full rounds
    refs = [autoregressive_generate(target, p, 32, greedy, eos_token_id=eos).tokens for p in ids]
    if name == "replay":  # rows accept different amounts every round: all, none, some
        longest = max(range(len(refs)), key=lambda i: len(refs[i]))  # the always-accepting row: many full rounds
        plan = [{5}, {2, 7, 8}, {1}]
        corrupts = [set() if i == longest else (set(range(99)) if i == (longest + 1) % 4 else plan.pop()) for i in range(4)]
        session = ReplaySession(refs, 4, corrupts, [len(p) for p in ids])
    else:
        drafter, _ = build_drafter(TrainStageConfig(target=TOY, drafter=DRAFTERS[name], cache_dir="x"), torch.device("cpu"))
        session = make_session(drafter.eval(), len(ids))
    got = speculative_generate_batch(target, session, ids, 32, greedy, eos_token_id=eos)
    assert [r.tokens for r in got] == refs
    if name == "replay":
        full = got[longest].accepted_per_round
        assert got[(longest + 1) % 4].tau == 1.0
        assert len(full) > 2 and all(m == 4 for m in full[:-1]), full  # the row's history survives full rounds


@pytest.mark.parametrize("corrupt", [[set(range(99))], [{3, 11, 12, 25}], [{2, 7}, set(range(99))]])
def test_target_cache_keeps_no_slot_that_every_row_rejected(toy, corrupt, monkeypatch):
    """Rejections are a suffix of each row's block, so the slots after the longest kept prefix are holes in
    every row and are cropped: every cache column a round starts from was kept by some row, and a batch of
    one attends over exactly the tokens it emitted (no holes)."""
    target, tok = toy
    greedy = SamplingConfig(temperature=0)
    ids = prompts(tok, len(corrupt))
    refs = [autoregressive_generate(target, p, 24, greedy).tokens for p in ids]
    calls = []  # (new tokens, the mask over cache + new) of every target forward after the prefill
    real = target.decoder_with_positions
    monkeypatch.setattr(target, "decoder_with_positions", lambda i, m, *a: calls.append((i.shape[1], m.clone())) or real(i, m, *a))
    session = ReplaySession(refs, 4, corrupt, [len(p) for p in ids])
    got = speculative_generate_batch(target, session, ids, 24, greedy)
    assert [r.tokens for r in got] == refs
    for width, mask in calls[1:]:
        if len(mask) < len(ids):  # a row finished and left: the slots only it held are holes of the others
            continue  # (compacted by share, ``_compact_holes``)
        assert bool(mask[:, :-width].any(0).all()), "a cache column that no row kept survived a round"
        if len(ids) == 1:
            assert bool(mask.all()), "a batch of one attended over a hole"


def test_finished_rows_leave_the_target_batch(toy, monkeypatch):
    """Rows finish rounds apart (one accepts every draft, one none, one some): each round's target forward runs the
    rows still active, and no others, and the output is plain greedy's."""
    target, tok = toy
    greedy = SamplingConfig(temperature=0)
    ids = prompts(tok, 3)
    refs = [autoregressive_generate(target, p, 24, greedy).tokens for p in ids]
    rows_per_forward = []
    real = target.decoder_with_positions
    monkeypatch.setattr(target, "decoder_with_positions", lambda i, *a: rows_per_forward.append(len(i)) or real(i, *a))
    session = ReplaySession(refs, 4, [set(), set(range(99)), {2, 7, 11}], [len(p) for p in ids])
    got = speculative_generate_batch(target, session, ids, 24, greedy)
    assert [r.tokens for r in got] == refs
    rounds = [len(r.emitted_per_round) for r in got]
    assert len(set(rounds)) == 3, rounds  # the rows finished in different rounds
    active = [sum(n > k for n in rounds) for k in range(max(rounds))]  # rows still decoding in round k
    assert rows_per_forward == [3] + active  # the prefill, then one forward per round


def test_holes_are_compacted_and_decoding_is_unchanged(toy, monkeypatch):
    """Rows that reject different amounts leave holes in the target's cache; once they are COMPACT_AT of it, each
    row's real slots move together (in order, right-aligned): outputs stay plain greedy's, the compaction happened,
    and no round starts from a cache with more holes beyond the longest row than the threshold allows."""
    from deepspec.decoding import speculative
    from deepspec.decoding.target_cache import TargetCache

    target, tok = toy
    greedy = SamplingConfig(temperature=0)
    ids = prompts(tok, 3)
    refs = [autoregressive_generate(target, p, 48, greedy).tokens for p in ids]
    gathers, calls = [], []
    real_gather, real_forward = TargetCache.gather_slots, target.decoder_with_positions
    monkeypatch.setattr(TargetCache, "gather_slots", lambda self, s: gathers.append(s.shape) or real_gather(self, s))
    monkeypatch.setattr(target, "decoder_with_positions", lambda i, m, *a: calls.append((i.shape[1], m.clone())) or real_forward(i, m, *a))
    # row 0 accepts every draft (it sets the widest kept prefix), rows 1-2 reject most: holes in their rows
    session = ReplaySession(refs, 6, [set(), set(range(99)), {2, 5, 9, 14, 20, 27, 33}], [len(p) for p in ids])
    got = speculative_generate_batch(target, session, ids, 48, greedy)
    assert [r.tokens for r in got] == refs
    assert gathers, "ragged acceptance never triggered a compaction"
    for width, mask in calls[1:]:
        cache = mask[:, :-width]
        beyond_longest = cache.shape[1] - int(cache.sum(1).max())
        assert beyond_longest < max(cache.shape[1] * speculative.COMPACT_AT, 1), "a round started from an uncompacted cache"


class RandomPlainRounds(VerifyScheduler):
    """Fixed-length verification, with rounds decoded plainly at random (as the draft-cost gate decides)."""

    def __init__(self, g: int, seed: int):
        super().__init__(ScheduleConfig(policy="fixed"), g)
        self.coin = torch.Generator().manual_seed(seed)

    def should_draft(self, rows):
        return bool(torch.rand((), generator=self.coin) < 0.5)


class QueueRecorder:
    """A session that keeps what the loop hands ``extend`` (the tensors themselves, no copies) and drafts as ``inner``."""

    def __init__(self, inner):
        self.inner, self.block_size, self.queued = inner, inner.block_size, []

    def extend(self, features, tokens, valid):
        self.queued.append((tokens, valid))
        self.inner.extend(features, tokens, valid)

    def draft(self, *args):
        return self.inner.draft(*args)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_drafter_is_handed_each_rows_tokens_in_order_through_plain_and_drafted_rounds(toy, seed):
    """Read at the end, what the loop queued for the drafter is each row's prompt then its emitted tokens, in order
    (up to the anchor; a last round's accepted drafts past max_new_tokens may follow): the loop must not write into
    tensors it handed over (the anchors of a plain round are queued as a view, not a copy)."""
    target, tok = toy
    drafter, _ = build_drafter(TrainStageConfig(target=TOY, drafter=DRAFTERS["dspark"], cache_dir="x"), torch.device("cpu"))
    ps = prompts(tok, 3)  # different lengths (left padding); rows finish at different rounds (EOS or the limit)
    session = QueueRecorder(make_session(drafter.eval(), len(ps)))
    res = speculative_generate_batch(target, session, ps, 40, SamplingConfig(temperature=1.0), tok.eos_token_id,
                                     torch.Generator().manual_seed(seed), RandomPlainRounds(5, seed))
    for r, (prompt, out) in enumerate(zip(ps, res)):
        queued = [t for tokens, valid in session.queued for t, v in zip(tokens[r].tolist(), valid[r].tolist()) if v]
        emitted = prompt.tolist() + out.tokens
        assert len(queued) >= len(emitted) - 1 and queued == emitted[: len(queued)], r
