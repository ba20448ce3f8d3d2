"""Render samples with the target's chat template and mark the assistant tokens (the loss mask).

Two ways to find the assistant tokens, tried in this order:

1. The template has ``{% generation %}`` markers: ask the tokenizer for
   ``return_assistant_tokens_mask`` (HF's own mechanism).
2. Any other template (ChatML, Qwen, Llama 3, ...): render the conversation prefix by prefix. For
   assistant turn i, ``render(messages[:i], add_generation_prompt=True)`` must be a prefix of
   ``render(messages[:i+1])``; the characters between the two are the answer (content and the
   end-of-turn token; trailing whitespace after it is not trained). Characters map to tokens
   through the fast tokenizer's offsets.

A template for which neither works raises ``ChatTemplateError`` (a user can add generation markers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from deepspec.data.sources import Sample


class ChatTemplateError(ValueError):
    pass


@dataclass
class RenderedSample:
    sample_id: str
    input_ids: torch.Tensor  # (S,) int64
    loss_mask: torch.Tensor  # (S,) uint8, 1 on assistant tokens

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    return "{% generation %}" in (tokenizer.chat_template or "") or "{%- generation %}" in (tokenizer.chat_template or "")


def render_sample(tokenizer: PreTrainedTokenizerBase, sample: Sample, max_length: int) -> RenderedSample:
    """Tokenize one sample and build its loss mask; truncated to ``max_length`` tokens."""
    if sample.text is not None:
        ids = tokenizer(sample.text, add_special_tokens=True)["input_ids"]
        mask = [1] * len(ids)
    elif has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(sample.messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _render_by_prefixes(tokenizer, sample.messages)
    ids, mask = ids[:max_length], mask[:max_length]
    return RenderedSample(sample.sample_id, torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.uint8))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """Text the model continues to answer the last user turn of ``messages``."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _render_by_prefixes(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier "
                "turns); add {% generation %} markers to it so assistant tokens can be found")
        answer = through[len(before):]
        spans.append((len(before), len(before) + len(answer.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < end and e > start for start, end in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
