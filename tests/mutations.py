"""Single-line mutations of the core math and the tests that must fail on each (scripts/mutation_check.py).

Each entry: (name, file, exact original text, mutated text, pytest selection). Equivalent mutants (a change no test can see because the
output is provably the same) are left out, with a note where one is tempting. The original text
must occur exactly once in the file: a refactor that moves it makes the check fail loudly, so this
list moves with the code. Grouped like the issue that asked for it: acceptance, bonus, q,
cache/holes, Algorithm 1, STS and calibration, losses, anchors/blocks, Markov heads, sessions.
"""
from __future__ import annotations

LAW = "tests/test_exact_law.py"
FAST_LAW = (LAW + " tests/test_speculative.py"  # one -k for both files: pytest keeps only the last -k
            " -k 'vanilla-T1.0-k0-p1.0-fixed or gated or dflash-T1.0 or threshold or greedy or rejection_sampling'")
SESSIONS = "tests/test_sessions.py"
SCHED = "tests/test_scheduler.py"
METRICS = "tests/test_eval_metrics.py"
LOSSES = "tests/test_losses.py"
DRAFTERS = "tests/test_drafters.py"
SPEC = "tests/test_speculative.py -m 'not slow'"

REF = "deepspec/decoding/kernels/reference.py"
DV = "tests/test_draft_vocab.py -m 'not slow'"
VOCAB_MAP = "deepspec/drafters/draft_vocab.py"
MUTATIONS = [
    # acceptance rule, residual, bonus position (PyTorch reference of the verify kernel)
    ("accept ratio inverted", REF, "(u_accept < p_d / q_d.clamp_min(1e-30))", "(u_accept < q_d / p_d.clamp_min(1e-30))", FAST_LAW),
    ("accept with <= instead of <", REF, "(u_accept < p_d / q_d.clamp_min(1e-30))", "(u_accept * 0.9 < p_d / q_d.clamp_min(1e-30))", FAST_LAW),
    ("residual is p, not max(0, p - q)", REF, "torch.addcmul(p_m, q_m, rejected, value=-1.0).clamp_min_(0)", "p_m.clone()", FAST_LAW),
    ("residual not clamped at 0", REF, "rejected, value=-1.0).clamp_min_(0)", "rejected, value=-1.0).abs_()", FAST_LAW),
    ("bonus from the last draft's position", REF, "p_m, q_m = p[n, m], q[", "p_m, q_m = p[n, m.clamp(max=g - 1)], q[", FAST_LAW),
    ("the next token by inversion may draw a token of weight 0", REF, "cdf[:, -1:], right=True)", "cdf[:, -1:], right=False)",
     LAW + " -k draws_by_inversion"),
    ("drafts accepted beyond the verified prefix", REF, "m = ((u_accept < p_d / q_d.clamp_min(1e-30)) & inside)",
     "m = ((u_accept < p_d / q_d.clamp_min(1e-30)) | ~inside)", FAST_LAW),
    ("greedy compares drafts with the next position", REF, "m = ((target[:, :g] == draft) & inside)", "m = ((target[:, 1:] == draft) & inside)", FAST_LAW),
    ("Gumbel noise ignored at T=1 (Markov walk)", REF, "(base + noise_g if temperature == 1", "(base if temperature == 1", FAST_LAW),
    # q must be the distribution the token was sampled from
    ("q without the Markov bias (CUDA's Gumbel walk)", "deepspec/decoding/sessions/dspark.py", "sampling.probs(logits) if q is None else q",
     "sampling.probs(base.float()) if q is None else q", LAW + " -k gumbel"),
    ("q reported is not the sampled distribution (unfused walk)", "deepspec/decoding/sessions/dspark.py", "            probs.append(qk)",
     "            probs.append(torch.softmax(lk, -1))", LAW + " -k 'vanilla-T0.5 or gated'"),
    # target cache holes and crop, drafter state
    ("accepted anchor dropped from the cache", "deepspec/decoding/speculative.py", "keep = _of_every_row((steps <= m[:, None]).long()",
     "keep = _of_every_row((steps < m[:, None]).long()", FAST_LAW),
    ("rejected positions not turned into holes", "deepspec/decoding/speculative.py", "        batch.mask[:, -W:] = keep  # rejected positions become holes",
     "        pass", FAST_LAW),
    ("positions count the holes", "deepspec/decoding/speculative.py", "        batch.lengths += kept\n", "        batch.lengths += W\n", FAST_LAW),
    ("rows' positions aligned to the longest row", "deepspec/decoding/speculative.py",
     "batch.mask, batch.lengths[:, None] + steps, batch.cache)", "batch.mask, batch.lengths.max() + steps[None], batch.cache)", FAST_LAW),
    ("drafter context one position off", "deepspec/decoding/sessions/draft.py", "            pos = start[:, None] + torch.arange(",
     "            pos = 1 + start[:, None] + torch.arange(", SESSIONS),
    ("Eagle3 last position paired with the wrong token", "deepspec/decoding/sessions/eagle3.py",
     "nxt[torch.arange(N, device=toks.device), counts - 1] = anchors", "nxt[torch.arange(N, device=toks.device), counts - 1] = 0", SESSIONS),
    ("pending queue not consumed", "deepspec/decoding/sessions/state.py", "        if every_row:\n            self.chunks = []", "        if every_row:\n            pass", SESSIONS),
    # Algorithm 1 and survival
    ("Algorithm 1 searches globally", "deepspec/decoding/scheduler.py", "        if gain <= 0 or new_theta <= theta:  # the first column",
     "        if gain <= 0 or new_theta <= theta and False:  # the first column", SCHED),
    ("zero survival admitted", "deepspec/decoding/scheduler.py", "    positive = (survival > 0).int()", "    positive = (survival >= 0).int()", SCHED),
    ("survival per slot, not cumulative", "deepspec/calibration.py", "    return torch.cumprod(conf.double(), dim=-1)", "    return conf.double()", SCHED + " " + METRICS),
    ("token-level Algorithm 1 admits zero survival", "deepspec/decoding/scheduler.py", "        if a <= 0 or (tau + a) * sps(B + 1) <= tau * sps(B):",
     "        if (tau + a) * sps(B + 1) < tau * sps(B):", SCHED),
    # the draft-cost gate and the verify-cost profile
    ("gate ignores the drafted rounds' measured slowdown", "deepspec/decoding/scheduler.py",
     "slowdown = max(self.ratio(True, R), self.ratio(False, R))", "slowdown = self.ratio(False, R)", SCHED),
    ("a drafted round may be predicted cheaper than a plain step", "deepspec/decoding/scheduler.py",
     "slowdown = max(self.ratio(True, R), self.ratio(False, R))", "slowdown = self.ratio(True, R)", SCHED),
    ("probes ignore their budget", "deepspec/decoding/scheduler.py", "self.probing = self.budget > 0 and self.debt <= 0.0", "self.probing = True", SCHED),
    ("the gate averages round times (one stall flips it)", "deepspec/decoding/scheduler.py",
     "self.value = sorted(self.recent)[len(self.recent) // 2]", "self.value = sum(self.recent) / len(self.recent)", SCHED),
    ("a catch-up's seconds become the draft cost", "deepspec/decoding/scheduler.py",
     "        if steady:\n            self.draft_seconds", "        if True:\n            self.draft_seconds", SCHED),
    ("a catch-up round's time becomes the drafted rounds' slowdown", "deepspec/decoding/scheduler.py",
     "        if steady or not drafted:", "        if True:", SCHED),
    ("the first round at a new load may draft", "deepspec/decoding/scheduler.py",
     "        if len(self.slowdown[False].get(load, ())) < self.plain_samples:\n            return False", "        if False:\n            return False", SCHED),
    ("one measured/predicted ratio for every load", "deepspec/decoding/scheduler.py",
     "by_load, load = self.slowdown[drafted], R.bit_length()", "by_load, load = self.slowdown[drafted], 1", SCHED),
    ("drafting at a load never timed is not a probe", "deepspec/decoding/scheduler.py",
     "            if load in self.slowdown[True]:\n                return True", "            if True:\n                return True", SCHED),
    ("the measuring probe stops after its catch-up", "deepspec/decoding/scheduler.py",
     "            if steady or not self.draft_seconds:", "            if not self.draft_seconds:", SCHED),
    ("the gate trusts an acceptance estimate selected at its highs", "deepspec/decoding/scheduler.py",
     "draft, k = self.draft_cost(R), self.acceptance_ratio(R)", "draft, k = self.draft_cost(R), 1.0", SCHED),
    ("the drafted arm's rates kept after the gains change", "deepspec/decoding/scheduler.py",
     "key = (R, tuple(column_gains), cost,", "key = (R, len(column_gains), cost,", SCHED),
    ("one unlucky round zeroes the acceptance ratio", "deepspec/decoding/scheduler.py",
     "        return (prior + sum(a for a, _ in recent)) / (prior + sum(e for _, e in recent))",
     "        return sum(a for a, _ in recent) / sum(e for _, e in recent)", SCHED),
    ("drafting need not win by the margin", "deepspec/decoding/scheduler.py",
     "> plain * (1 + self.margin):", "> plain:", SCHED),
    ("promised drafts counted past the verified length", "deepspec/decoding/scheduler.py",
     "(torch.arange(self.g) < verified.cpu()[:, None])", "(torch.arange(self.g) <= verified.cpu()[:, None])", SCHED),
    ("the gate drafts after one timed plain step", "deepspec/decoding/scheduler.py",
     "    plain_samples = 3  #", "    plain_samples = 1  #", SCHED),
    ("the scheduler calls every drafted round steady", "deepspec/decoding/scheduler.py",
     "        self._steady = drafted\n", "        self._steady = True\n", SCHED),
    ("a plain streak observed as one round", "deepspec/decoding/scheduler.py",
     "predicted = rounds * (cost(R, width)", "predicted = (cost(R, width)", SCHED),
    ("a plain streak never ends", "deepspec/decoding/scheduler.py",
     "        if self._plain_left and R == self._streak[0]:", "        if self._streak[0]:", SCHED),
    ("a streak cut by a leaving row is not observed", "deepspec/decoding/scheduler.py",
     "            return False\n        self._end_streak()\n", "            return False\n        self._streak = (0, 0, 0.0)\n", SCHED),
    ("cost profile not monotone in rows", "deepspec/decoding/scheduler.py", "t[i][j] = min(t[i][j], t[i + 1][j])", "t[i][j] = t[i][j]", SCHED),
    ("a new generation forgets the acceptance seen so far", "deepspec/decoding/scheduler.py",
     "self.online = self.prior.expand(batch_size, -1).clone()", "self.online = torch.full((batch_size, self.g), 0.5, dtype=torch.float64)",
     SCHED),
    ("the gate keeps the survival sums of before a drafted round", "deepspec/decoding/scheduler.py",
     "            return\n        self._gains = None\n", "            return\n", SCHED),
    ("the walk by inversion samples from another q than it returns", "deepspec/decoding/kernels/reference.py",
     "        x = draw_by_inversion(q_k, u_k)", "        x = draw_by_inversion(torch.softmax(l_k, dim=-1), u_k)", "tests/test_exact_law.py"),
    # STS and calibration metrics
    ("STS fits each position independently", "deepspec/calibration.py", "            trial = temps[:k] + [t] + [1.0] * (g - k - 1)",
     "            trial = [1.0] * k + [t] + [1.0] * (g - k - 1)", METRICS),
    ("ECE without the absolute value", "deepspec/calibration.py", "* abs(float(pred[sel].mean()) - float(label[sel].float().mean()))",
     "* (float(pred[sel].mean()) - float(label[sel].float().mean()))", METRICS),
    ("temperature multiplies the logit", "deepspec/calibration.py", "    return torch.sigmoid(logit / t).to(conf.dtype)", "    return torch.sigmoid(logit * t).to(conf.dtype)", METRICS),
    # losses
    # (exp(-(k+1)/g) would be an equivalent mutant: the weights are normalised by their sum)
    ("slot weights decay half as fast", "deepspec/losses.py", "torch.exp(-torch.arange(g, device=h.device, dtype=torch.float32) / cfg.decay_gamma)",
     "torch.exp(-torch.arange(g, device=h.device, dtype=torch.float32) / (2 * cfg.decay_gamma))", LOSSES),
    ("soft label 1 - L1 instead of 1 - L1/2", "deepspec/losses.py", "    acc = (1 - 0.5 * l1).clamp(0, 1).detach()", "    acc = (1 - l1).clamp(0, 1).detach()", LOSSES),
    ("Eagle3 step weights not decayed", "deepspec/losses.py", "        total = total + step_decay**k * mean_ce", "        total = total + mean_ce", LOSSES),
    # anchors and block validity
    ("anchor rule ignores the next token's mask", "deepspec/drafters/blocks.py", "    cand[:, :-1] = m[:, :-1] & m[:, 1:]", "    cand[:, :-1] = m[:, :-1]", DRAFTERS),
    ("validity not cumulative along the block", "deepspec/drafters/blocks.py", "keep[:, :, None]).int().cumprod(dim=-1).bool()", "keep[:, :, None]).bool()", DRAFTERS),
    # Markov heads
    ("gated head ignores its gate", "deepspec/drafters/heads.py", "            return torch.sigmoid(self.gate_proj(torch.cat([h, e_prev], -1))) * e_prev, None",
     "            return e_prev, None", DRAFTERS),
    ("RNN state not carried", "deepspec/drafters/heads.py", "        state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(c)",
     "        state = torch.tanh(c)", DRAFTERS),
    ("Markov walk conditions on the anchor every slot", "deepspec/decoding/sessions/dspark.py", "            prev = self.d.draft_to_target(sample(qk, generator))",
     "            self.d.draft_to_target(sample(qk, generator)); prev = anchors", SESSIONS),
    # reduced draft vocabulary (tests/test_draft_vocab.py)
    ("vocab: map ties broken by the larger id", VOCAB_MAP, "order = torch.sort(-counts.to(torch.int64), stable=True).indices",
     "order = torch.sort(-counts.to(torch.int64).flip(0), stable=True).indices.flip(0)", DV + " -k map"),
    ("vocab: d2t holds target ids, not offsets", VOCAB_MAP, "return self.draft_ids - torch.arange(self.size, dtype=torch.int64)",
     "return self.draft_ids.clone()", DV + " -k 'map or export'"),
    ("vocab: counts every token, not the labels", "deepspec/data/cache/token_counts.py", "return np.asarray(input_ids)[1:][np.asarray(loss_mask)[1:] != 0]",
     "return np.asarray(input_ids)[1:]", DV + " -k counts"),
    ("vocab: counts the label's previous token", "deepspec/data/cache/token_counts.py", "return np.asarray(input_ids)[1:][np.asarray(loss_mask)[1:] != 0]",
     "return np.asarray(input_ids)[:-1][np.asarray(loss_mask)[1:] != 0]", DV + " -k counts"),
    ("vocab: L1 drops the target mass outside the draft vocabulary", "deepspec/losses.py",
     "    l1 = (logp_d.exp() - p_in).abs().sum(-1) + p_out", "    l1 = (logp_d.exp() - p_in).abs().sum(-1)", DV + " -k loss"),
    ("vocab: CE trains labels outside the draft vocabulary as draft id 0", "deepspec/losses.py",
     "    ce = -logp_d.gather(-1, draft_labels.clamp_min(0)[..., None]).squeeze(-1) * in_vocab",
     "    ce = -logp_d.gather(-1, draft_labels.clamp_min(0)[..., None]).squeeze(-1)", DV + " -k loss"),
    ("vocab: Eagle3 soft label not renormalised", "deepspec/losses.py",
     "    soft = p_in if drafter.d2t is None else p_in / p_in.sum(-1, keepdim=True).clamp_min(1e-30)", "    soft = p_in", DV + " -k eagle3_soft"),
    ("vocab: q scattered to the first N ids", VOCAB_MAP, "return None if self.d2t is None else torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t",
     "return None if self.d2t is None else torch.arange(len(self.d2t), device=self.d2t.device)", DV + " -k law"),
    ("vocab: drafted draft ids returned as target ids", VOCAB_MAP, "        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]",
     "        return draft_ids", DV + " -k law"),
    ("vocab: the walk feeds W1 the draft id", REF, "  # the walk: x_k from x_{k-1}\n        x = x if d2t is None else x + d2t[x]\n        tokens.append(x)\n    tokens = ",
     "  # the walk: x_k from x_{k-1}\n        tokens.append(x if d2t is None else x + d2t[x])\n    tokens = ", DV + " -k 'walk or law'"),
    ("vocab: the walk by inversion feeds W1 the draft id", REF,
     "draw_by_inversion(q_k, u_k)  # the walk: x_k from x_{k-1}\n        x = x if d2t is None else x + d2t[x]\n        tokens.append(x)",
     "draw_by_inversion(q_k, u_k)  # the walk: x_k from x_{k-1}\n        tokens.append(x if d2t is None else x + d2t[x])", DV + " -k walk"),
    ("vocab: the Triton walk feeds W1 the draft id", "deepspec/decoding/kernels/__init__.py",
     "        x = x if d2t is None else x + d2t[x]  # draft id -> target id (one gather per slot)", "", DV + " -k walk"),
    ("vocab: Eagle3 chain feeds back draft ids", "deepspec/decoding/sessions/eagle3.py",
     "            tok = d.draft_to_target(sample(qk, generator))  # (N,) target ids", "            tok = sample(qk, generator)", DV + " -k 'law and eagle3'"),
    ("vocab: export drops d2t", "deepspec/export.py", "        if k.startswith(TRAINING_ONLY) or k in left_out:",
     "        if k.startswith(TRAINING_ONLY) or k in left_out or k == 'd2t':", DV + " -k export"),
    ("vocab: reduced head re-initialised at random", "deepspec/drafters/block_backbone.py",
     "m.weight.requires_grad and not isinstance(m, DraftLMHead):", "m.weight.requires_grad:", DV + " -k 'greedy and dspark'"),
    ("vocab: a label's draft id off by one", VOCAB_MAP, "        index = self.t2d.long().cumsum(0) - 1",
     "        index = self.t2d.long().cumsum(0)", DV + " -k loss"),
    ("vocab: draft_vocab_size not range-checked", "deepspec/config/train.py", "    if n < 1 or (vocab_size is not None and n > vocab_size):",
     "    if n < -10:", DV + " -k config"),
    # elastic resume: the data position across a change of rank count
    ("elastic: earlier segments forgotten", "deepspec/data/cache/reader.py", "            consumed = consumed | taken\n",
     "            consumed = taken\n", "tests/test_verify_and_reader.py -k other_rank"),
    ("elastic: worker interleaving ignored", "deepspec/data/cache/reader.py",
     "return max(0, -(-(self.batches[rank] - worker) // self.workers)) * self.micro_batch_size",
     "return self.batches[rank] // self.workers * self.micro_batch_size", "tests/test_verify_and_reader.py -k other_rank"),
    ("decoding: the dense queue skips slots (fast path)", "deepspec/decoding/sessions/state.py",
     "            return feats, toks, torch.full_like(rows, toks.shape[1])", "            return feats[:, 1:], toks[:, 1:], torch.full_like(rows, toks.shape[1] - 1)",
     SESSIONS),
    ("decoding: a queue with rejected slots taken as dense", "deepspec/decoding/sessions/state.py",
     "        if every_row and all(bool(c[2].all()) for c in self.chunks):", "        if every_row:", SESSIONS),
    ("decoding: a batch of one writes its new context one slot late", "deepspec/decoding/sessions/draft.py",
     "                    cache.write_slots(C - T, k, v)", "                    cache.write_slots(C - T + 1, k, v)", SESSIONS),
]
