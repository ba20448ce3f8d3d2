"""Training-free proposals: n-gram matching over each row's own context, and the hybrid of it with a drafter.

Prompt lookup / suffix matching (Saxena 2023; transformers' ``prompt_lookup_num_tokens``; Arctic's suffix
decoding): take the longest suffix of the row's context, anchor included (``max_ngram`` tokens down to
``min_ngram``), find its latest earlier occurrence, and propose the tokens that followed it there. The match length
n is the proposal's score: the scheduler keeps an acceptance estimate per (n, slot).

A proposal is a function of the context alone, so its law is a point mass: q_k is the one-hot of d_k. Rejection
sampling with that q accepts d_k with probability p_k(d_k) and draws a rejection's token from p_k with d_k removed:
the target's law at any temperature, on the engine's one verify path (``one_hot_q``).

``HybridSession`` puts a drafter session and a lookup session behind the drafter interface: per row and round the
scheduler picks plain (verify nothing), the lookup's proposal or the drafter's block (``Proposal.source``), and one
verify pass checks the rows whatever their source.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepspec.decoding.sessions.draft import Draft

PLAIN, LOOKUP, MODEL = 0, 1, 2  # a row's source in a round


class NgramIndex:
    """Tokens of one or more sequences and, per n-gram (min_n <= n <= max_n), where it last ended: host dicts.

    Appending a token records the n-grams ending at it, so a lookup costs ``max_n - min_n + 1`` dict probes and an
    append as many inserts, whatever the context length. A long append (a prompt) inserts by one ``dict.update`` per
    n over zipped slices (C loops; a later occurrence overwrites an earlier one, as token-by-token inserts do): a
    920-token prompt in 0.32 ms, against 0.85 ms token by token, which 64 plain rounds of a generation paid as ~8 us
    each. A round's few tokens go token by token: 1 us a token against the bulk path's ~7 us fixed cost."""

    BULK = 16  # appends of at least this many tokens take the bulk path (the two break even at ~12)

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> position of its last token (latest occurrence)

    def append(self, tokens: list[int]) -> None:
        toks, start = self.tokens, len(self.tokens)
        if len(tokens) < self.BULK:
            for tok in tokens:
                toks.append(tok)
                end = len(toks)
                for n in range(self.min_n, min(self.max_n, end) + 1):
                    self.last[tuple(toks[end - n:])] = end - 1
            return
        toks.extend(tokens)
        end = len(toks)
        for n in range(self.min_n, min(self.max_n, end) + 1):
            first = max(start, n - 1) - n + 1  # the first new n-gram's first token (it ends at a new token)
            grams = zip(*(toks[first + i: end - n + 1 + i] for i in range(n)))  # each n-gram ending at a new token
            self.last.update(zip(grams, range(first + n - 1, end)))

    def match(self, suffix: list[int], length: int, own: bool) -> tuple[list[int], int]:
        """The continuation (up to ``length`` tokens) of the longest n-gram ending ``suffix`` seen here, and n (([], 0)
        when none). ``suffix`` ends with the anchor, which no index holds yet, so every occurrence found is earlier.
        ``own``: this index is the row's context, which the anchor continues (a match just before it proposes it)."""
        for n in range(min(self.max_n, len(suffix)), self.min_n - 1, -1):
            end = self.last.get(tuple(suffix[-n:]))
            if end is None:
                continue
            cont = self.tokens[end + 1: end + 1 + length]
            if own and len(cont) < length:
                cont.append(suffix[-1])
            if cont:
                return cont, n
        return [], 0


@dataclass
class Proposal:
    """One round's lookup proposals for the active rows, host lists (the gate reads them every round; tensors are made
    only for a round that verifies them)."""

    tokens: list[list[int]]
    """Per row the proposed tokens d_1..d_G (zeros past the row's ``length``)."""
    length: list[int]
    """Per row the tokens proposed (0 = no match)."""
    score: list[int]
    """Per row the match length n (0 = no match): what the acceptance estimate is kept by."""
    device: torch.device
    source: torch.Tensor | None = None
    """(N,) PLAIN / LOOKUP / MODEL per row: the scheduler's choice (set by its gate before the draft), on ``device``."""

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> tokens (N, G), length (N,), score (N,) on ``device``."""
        return (torch.tensor(self.tokens, device=self.device).view(len(self.length), -1), torch.tensor(self.length, device=self.device),
                torch.tensor(self.score, device=self.device))


def one_hot_q(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """tokens (N, G) -> q (N, G, V): a deterministic proposal's law, the one-hot of each drafted token.

    Zeros and a scatter, not ``F.one_hot(...).float()``: that writes an int64 tensor and then converts it, 3x the bytes
    (at V = 152k and G = 10: 1.08 ms per row and round against 0.11 ms, 74 ms against 22 ms at 8 rows)."""
    return torch.zeros(*tokens.shape, V, device=tokens.device).scatter_(-1, tokens[..., None], 1.0)


@dataclass
class ProposalDraft(Draft):
    """A round's draft from a lookup session (and a hybrid's drafter rows): the lookup rows' law is the one-hot of
    their tokens, built for the verified slots only (``verified_q``): an (N, G, V) q is 6 MB per row at V = 152k and
    G = 10, of which a probe verifying one token reads a tenth. ``q`` holds the drafter rows' own laws (M, g, V)
    (``model_rows``, None: no drafter row)."""

    vocab_size: int = 0
    sampled: bool = False  # T > 0: the verifier reads laws (greedy reads none)
    model_rows: torch.Tensor | None = None  # (M,) the rows drafted by the model, whose laws are ``q``

    def verified_q(self, W: int) -> torch.Tensor | None:
        if not self.sampled:
            return None
        q = one_hot_q(self.tokens[:, : W - 1], self.vocab_size)  # (N, W-1, V)
        if self.model_rows is not None:  # the drafter's rows keep the law they were sampled from (0 past its block)
            k = min(W - 1, self.q.shape[1])
            q[self.model_rows] = F.pad(self.q[:, :k].float(), (0, 0, 0, W - 1 - k))
        return q


class LookupSession:
    """Per row an n-gram index of its context (prompt and emitted tokens), optionally a shared one across rows and
    generations (``shared``). Same interface as the drafter sessions (``extend``, ``draft``) plus ``propose``."""

    def __init__(self, batch_size: int, tokens: int, min_n: int, max_n: int, vocab_size: int, shared: NgramIndex | None = None):
        self.g, self.V, self.shared = tokens, vocab_size, shared
        self.rows = [NgramIndex(min_n, max_n) for _ in range(batch_size)]
        self.proposal: Proposal | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tokens (B, T), valid (B, T)) not yet indexed

    @property
    def block_size(self) -> int:
        return self.g

    def extend(self, features: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Queue each row's verified tokens (B, T), valid (B, T) (features unused); ``propose`` indexes the queue first.
        Just a list append: while no source can pay, the scheduler asks for no proposal (``HybridScheduler.wants_proposal``)
        and a plain round's tokens wait for the next proposal, which indexes a streak's rounds in one host copy
        (a copy per round cost ~17 us at 1 row and ~90 us at 8 right after a target step: 0.3-0.7% of a toy step).
        A shared index outlives the session (later generations match against it), so with one nothing waits."""
        self.pending.append((tokens, valid))
        if self.shared is not None:
            self._index_pending()

    def _index_pending(self) -> None:
        """Append the queued rounds' tokens to the rows' indexes, row by row (with a shared index the queue holds one
        round, so the shared index gets the rows' tokens in the order a per-round append gives them)."""
        if not self.pending:
            return
        chunks, self.pending = self.pending, []
        tokens = chunks[0][0] if len(chunks) == 1 else torch.cat([t for t, _ in chunks], dim=1)
        valid = chunks[0][1] if len(chunks) == 1 else torch.cat([v for _, v in chunks], dim=1)
        for index, toks, ok in zip(self.rows, tokens.tolist(), valid.tolist()):
            new = [t for t, v in zip(toks, ok) if v]
            index.append(new)
            if self.shared is not None:
                self.shared.append(new)

    def propose(self, rows: torch.Tensor, anchors: torch.Tensor) -> Proposal:
        """rows (N,), anchors (N,) -> each row's proposal (its own context first, then the shared index)."""
        self._index_pending()
        N, G = len(rows), self.g
        tokens, length, score = [[0] * G for _ in range(N)], [0] * N, [0] * N
        for i, (r, anchor) in enumerate(zip(rows.tolist(), anchors.tolist())):
            index = self.rows[r]
            suffix = index.tokens[-(index.max_n - 1):] + [anchor] if index.max_n > 1 else [anchor]
            cont, n = index.match(suffix, G, own=True)
            if not cont and self.shared is not None:
                cont, n = self.shared.match(suffix, G, own=False)
            tokens[i][: len(cont)], length[i], score[i] = cont, len(cont), n
        self.proposal = Proposal(tokens, length, score, anchors.device)
        return self.proposal

    def draft(self, rows: torch.Tensor, anchors: torch.Tensor, sampling, generator) -> ProposalDraft:
        """The last proposal as a draft: one-hot laws (built when verified), confidence 1 on the proposed slots, 0 past
        them (the scheduler reads its own estimate by score; the zeros bound the verified length)."""
        tokens, length, _ = self.proposal.tensors()
        conf = (torch.arange(self.g, device=length.device)[None] < length[:, None]).float()
        return ProposalDraft(tokens, None, conf, vocab_size=self.V, sampled=not sampling.greedy)


class HybridSession:
    """A drafter session (None: the lookup alone) and a lookup session behind the drafter interface, for one batch.

    Per round: ``propose`` (the lookup's proposals for the active rows), the scheduler's gate sets each row's source
    on the proposal, then ``draft`` runs the drafter on the rows whose source is MODEL only and returns one Draft for
    all rows: lookup rows carry their proposal with a one-hot q, plain rows nothing to verify (confidence 0)."""

    def __init__(self, model, lookup: LookupSession):
        self.model, self.lookup = model, lookup
        self.g = lookup.block_size  # the proposal width G: the lookup's tokens, at least the drafter's block
        if model is not None and model.block_size > self.g:
            raise ValueError(f"the lookup proposes {self.g} tokens, fewer than the drafter's block of {model.block_size}")

    @property
    def block_size(self) -> int:
        """G: the widest proposal of a round (the verify loop's block)."""
        return self.g

    @property
    def model_block_size(self) -> int:
        """g <= G: the drafter's block (its confidences are recorded for calibration at this width)."""
        return self.model.block_size if self.model is not None else self.g

    def extend(self, features: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        self.lookup.extend(features, tokens, valid)
        if self.model is not None:
            self.model.extend(features, tokens, valid)

    def propose(self, rows: torch.Tensor, anchors: torch.Tensor) -> Proposal:
        return self.lookup.propose(rows, anchors)

    def catch_up_tokens(self, rows: torch.Tensor) -> int:
        """The drafter's queued positions for these rows (``IncrementalSession.catch_up_tokens``); 0 without one."""
        return self.model.catch_up_tokens(rows) if self.model is not None else 0

    def draft(self, rows: torch.Tensor, anchors: torch.Tensor, sampling, generator) -> ProposalDraft:
        """rows (N,), anchors (N,) -> tokens (N, G), confidence (N, G), source (N,), and the laws of the verified slots
        (``ProposalDraft.verified_q``: one-hot for lookup rows, the drafter's q for its rows; none when greedy).

        A drafter row fills slots 1..g (g <= G); its confidence past g is 0, so no schedule verifies those slots."""
        out = self.lookup.draft(rows, anchors, sampling, generator)  # every row's lookup proposal
        source = self.lookup.proposal.source
        out.confidence = out.confidence * (source == LOOKUP)[:, None]  # plain rows verify nothing
        use = (source == MODEL).nonzero()[:, 0]
        if len(use):
            d, pad = self.model.draft(rows[use], anchors[use], sampling, generator), self.g - self.model.block_size
            out.tokens = out.tokens.index_put((use,), F.pad(d.tokens, (0, pad)))
            out.confidence = out.confidence.index_put((use,), F.pad(d.confidence.float(), (0, pad)))
            out.q, out.model_rows = d.q, use  # the drafter's rows keep the law they were sampled from
        out.source = source
        return out
