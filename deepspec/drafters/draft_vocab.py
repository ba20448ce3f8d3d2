"""A reduced draft vocabulary: the drafter predicts N of the target's V tokens.

At V = 151,936 the LM head dominates a small drafter (d x V parameters, a (tokens, V) logit tensor
per step). With ``draft_vocab_size = N`` the drafter owns a trainable LM head over the N most
frequent supervised tokens of the training cache (``deepspec/data/cache/token_counts.py``), and
maps between the two id spaces with the tensors every serving engine reads:

    draft_ids (N,)  the target ids of the draft vocabulary, ascending
    d2t (N,) int64  offset: target_id = draft_id + d2t[draft_id]      (vLLM, SGLang, TensorRT-LLM, SpecForge)
    t2d (V,) bool   t2d[target_id]: the token is in the draft vocabulary (training only; engines skip it)

Losslessness does not change: the drafter's q is a distribution over the full vocabulary with
zeros outside the draft ids (``to_target_vocab``), so verification sees what it always sees.
Inputs stay in target ids (the frozen embedding, DSpark's ``markov_w1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DraftVocab:
    """The draft vocabulary: ``draft_ids`` (N,) int64, ascending target ids, out of ``vocab_size``."""

    draft_ids: torch.Tensor
    vocab_size: int

    def __post_init__(self):
        ids = self.draft_ids
        if ids.dim() != 1 or len(ids) == 0 or bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= self.vocab_size:
            raise ValueError(f"draft ids must be strictly ascending target ids in [0, {self.vocab_size}) (got {len(ids)} ids)")

    @property
    def size(self) -> int:
        return len(self.draft_ids)

    @property
    def d2t(self) -> torch.Tensor:
        """(N,) int64 offsets: target_id = draft_id + d2t[draft_id]."""
        return self.draft_ids - torch.arange(self.size, dtype=torch.int64)

    @property
    def t2d(self) -> torch.Tensor:
        """(V,) bool: the target id is in the draft vocabulary."""
        return torch.zeros(self.vocab_size, dtype=torch.bool).index_fill_(0, self.draft_ids, True)

    @classmethod
    def from_counts(cls, counts: torch.Tensor, size: int) -> DraftVocab:
        """The ``size`` most frequent ids of ``counts`` (V,), ties broken by the smaller id, sorted ascending."""
        V = len(counts)
        # A stable sort on -count keeps equal counts in id order: the same map on every rank and machine.
        order = torch.sort(-counts.to(torch.int64), stable=True).indices
        return cls(torch.sort(order[:size]).values.to(torch.int64), V)

    @classmethod
    def from_d2t(cls, d2t: torch.Tensor, vocab_size: int) -> DraftVocab:
        return cls(torch.arange(len(d2t), dtype=torch.int64) + d2t.to(torch.int64), vocab_size)

    def save(self, path: str | Path, counts: torch.Tensor | None = None) -> Path:
        """``path`` (.safetensors): d2t, t2d (and the token counts it was chosen from, when given)."""
        from safetensors.torch import save_file

        tensors = {"d2t": self.d2t, "t2d": self.t2d}
        if counts is not None:
            tensors["token_counts"] = counts.to(torch.int64)
        save_file(tensors, str(path), metadata={"draft_vocab_size": str(self.size), "vocab_size": str(self.vocab_size)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int) -> DraftVocab:
        """A map file written by ``save`` (or any safetensors file with a ``d2t`` tensor)."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "d2t" not in tensors:
            raise ValueError(f"{path}: no 'd2t' tensor (a draft vocabulary map has d2t (N,) int64 offsets)")
        vocab = cls.from_d2t(tensors["d2t"], vocab_size)
        if "t2d" in tensors and not torch.equal(tensors["t2d"].bool(), vocab.t2d):
            raise ValueError(f"{path}: t2d does not mark exactly the ids that d2t maps to")
        return vocab


class LMHead(nn.Linear):
    """A bias-free LM head whose logits are soft-capped, cap * tanh(logits / cap), where ``softcap`` is set (a
    Gemma-4 drafter's draft logits: ``layer_family.py``)."""

    softcap: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


class DraftLMHead(LMHead):
    """The drafter's own LM head over the draft vocabulary (N, d), trainable; it starts as the target's rows
    of the draft ids (``init_trainable`` leaves it alone)."""


class DraftVocabMixin:
    """LM heads and id maps of a drafter, full or reduced vocabulary (mixed into the drafter modules).

    Full vocabulary (``vocab`` None): ``lm_head`` is the target's, frozen and shared, and there is no
    d2t/t2d (the state dict and export are those of a full-vocabulary drafter). Reduced: ``lm_head`` is a
    ``DraftLMHead`` (N, d), ``target_lm_head`` the target's frozen head (the losses' p_t), and the
    buffers ``d2t`` (N,) int64 and ``t2d`` (V,) bool travel with the weights.
    """

    def attach_lm_heads(self, target_head: nn.Linear | None, vocab: DraftVocab | None, d: int, softcap: float | None = None) -> None:
        """Call once in the constructor, where the full-vocabulary drafter registered its frozen head.
        ``target_head`` may be None for a reduced drafter loaded for decoding only (no losses). ``softcap``: the
        drafter's logits are capped (Gemma-4); at full vocabulary ``lm_head`` is then a capped head sharing the
        target's frozen weight and ``target_lm_head`` the uncapped one (the losses cap p_t themselves)."""
        if vocab is None:
            self.lm_head = target_head.requires_grad_(False)
            if softcap is not None:
                self.target_lm_head = target_head
                self.lm_head = LMHead(*reversed(target_head.weight.shape), bias=False, device="meta")
                self.lm_head.weight, self.lm_head.softcap = target_head.weight, float(softcap)
            self.register_buffer("d2t", None)
            self.register_buffer("t2d", None)
            return
        self.lm_head = DraftLMHead(d, vocab.size, bias=False)
        self.lm_head.softcap = None if softcap is None else float(softcap)
        if target_head is not None:
            self.target_lm_head = target_head.requires_grad_(False)
            with torch.no_grad():
                self.lm_head.weight.copy_(target_head.weight[vocab.draft_ids.to(target_head.weight.device)])
            self.lm_head.to(target_head.weight.device)
        self.register_buffer("d2t", vocab.d2t.to(self.lm_head.weight.device))
        self.register_buffer("t2d", vocab.t2d.to(self.lm_head.weight.device))

    @property
    def draft_vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def target_head(self) -> nn.Module:
        """The target's LM head, uncapped (p_t in the losses): ``lm_head`` itself at full vocabulary unless the draft
        logits are capped."""
        head = self._modules.get("target_lm_head")
        if head is None and self.d2t is None:
            return self.lm_head
        if head is None:
            raise RuntimeError("this reduced-vocabulary drafter was loaded without the target's LM head: pass target= to "
                               "load_drafter to compute losses (decoding does not need it)")
        return head

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """(N,) the target ids of the draft vocabulary, ascending (None at full vocabulary)."""
        return None if self.d2t is None else torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """(...) draft ids -> (...) target ids (identity at full vocabulary)."""
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """(...) target ids -> (...) draft ids, -1 outside the draft vocabulary (identity at full vocabulary)."""
        if self.t2d is None:
            return target_ids
        index = self.t2d.long().cumsum(0) - 1  # (V,) draft ids are ascending: a target id's draft id is its rank
        return torch.where(self.t2d[target_ids], index[target_ids], -1)

    def to_target_vocab(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N) values over the draft vocabulary -> (..., V) with zeros outside it (identity at full vocabulary)."""
        if self.d2t is None:
            return x
        return x.new_zeros(*x.shape[:-1], len(self.t2d)).index_copy_(-1, self.draft_ids, x)
