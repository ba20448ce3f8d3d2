"""Regenerate assistant answers with the target itself, so the drafter learns the target's outputs.

Two backends answer a batch of conversations (each ending with a user turn):

* ``HFAnswerGenerator``: batched ``generate`` on the target (left padding, sampling from config);
* ``OpenAIAnswerGenerator``: POST ``/v1/chat/completions`` to any OpenAI-compatible server
  (vLLM, SGLang, TGI, ...), ``batch_size`` requests in flight.

Multi-turn rows are answered turn by turn: answer t is generated after the model's own answers
1..t-1. ``regenerate_samples`` is resumable: finished rows are appended to a JSONL file keyed by
sample id, written a whole batch at a time. A resumed run asks again only for missing ids; with the
HF backend, whose answers depend on the batch (padding, one RNG stream), it regenerates the whole
batch of a missing id with the same composition and seed, so it reproduces an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from deepspec.config.data import RegenerateConfig
from deepspec.data.chat import render_prompt
from deepspec.data.sources import Sample
from deepspec.progress import Progress, TokenCounter


class AnswerGenerator(Protocol):
    batch_independent: bool  # True when one row's answer does not depend on the rows batched with it

    def answer(self, conversations: list[list[dict]]) -> list[str | None]:
        """One answer per conversation (None where it failed)."""


class HFAnswerGenerator:
    """Batched sampling from an HF causal LM."""

    batch_independent = False  # padding and the shared RNG stream tie a row to its batch

    def __init__(self, model, tokenizer, cfg: RegenerateConfig, progress: Progress | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.streamer = TokenCounter(progress, tokenizer.pad_token_id) if progress is not None else None  # tokens as made

    @torch.no_grad()
    def answer(self, conversations: list[list[dict]]) -> list[str | None]:
        tok, cfg = self.tokenizer, self.cfg
        prompts = [render_prompt(tok, c) for c in conversations]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        finally:
            tok.padding_side = side
        sample = cfg.temperature > 0
        out = self.model.generate(
            **enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None, top_k=(cfg.top_k or None) if sample else None, streamer=self.streamer,
        )
        new_tokens = out[:, enc["input_ids"].shape[1]:]  # (B, T)
        return [t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]


class OpenAIAnswerGenerator:
    """Chat completions from an OpenAI-compatible server, ``batch_size`` requests at a time."""

    batch_independent = True

    def __init__(self, cfg: RegenerateConfig, model_name: str):
        self.cfg, self.model_name = cfg, model_name
        self.endpoint = cfg.url.rstrip("/") + ("" if cfg.url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.api_key = os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.errors: list[str] = []

    def _one(self, messages: list[dict]) -> str | None:
        cfg = self.cfg
        body = {"model": self.model_name, "messages": messages, "max_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p}
        if cfg.top_k:
            body["top_k"] = cfg.top_k  # vLLM / SGLang extension; ignored by servers without it
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        for attempt in range(cfg.max_retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=cfg.timeout_seconds) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"].strip()
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError, ConnectionError) as e:
                if attempt == cfg.max_retries:
                    self.errors.append(f"{self.endpoint}: {e}")
                    return None
                time.sleep(min(2.0 ** attempt, 10.0))
        return None

    def answer(self, conversations: list[list[dict]]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.cfg.batch_size) as pool:
            return list(pool.map(self._one, conversations))


def _answer_turn_by_turn(generator: AnswerGenerator, samples: list[Sample]) -> list[list[dict] | None]:
    """Replace every assistant turn by a generated one (None for a sample whose generation failed)."""
    prompts = [[m for m in s.messages if m["role"] != "assistant"] for s in samples]
    done: list[list[dict] | None] = [[] for _ in samples]
    max_users = max(sum(m["role"] == "user" for m in p) for p in prompts)
    for turn in range(max_users):
        todo, convs = [], []
        for i, p in enumerate(prompts):
            users = [j for j, m in enumerate(p) if m["role"] == "user"]
            if done[i] is None or turn >= len(users):
                continue
            start = users[turn - 1] + 1 if turn else 0
            done[i] = done[i] + p[start : users[turn] + 1]  # system/user messages up to this user turn
            todo.append(i)
            convs.append(done[i])
        for i, ans in zip(todo, generator.answer(convs)):
            done[i] = None if not ans else done[i] + [{"role": "assistant", "content": ans}]
    return done


def regenerate_samples(samples: list[Sample], generator: AnswerGenerator, done_path: Path, batch_size: int,
                       seed: int, progress: Progress | None = None) -> tuple[list[Sample], int]:
    """Answer ``samples`` with ``generator``, resuming from ``done_path``; ``progress`` counts answered samples.

    Returns (samples with regenerated messages, in input order; number of samples that failed).
    """
    done = _read_done(done_path)
    failed = 0
    with open(done_path, "a", encoding="utf-8") as f:
        for b in range(0, len(samples), batch_size):
            batch = [s for s in samples[b : b + batch_size] if s.messages is not None]
            if generator.batch_independent:
                batch = [s for s in batch if s.sample_id not in done]
            if not batch or all(s.sample_id in done for s in batch):
                if progress is not None:
                    progress.skip(len(batch))
                continue
            torch.manual_seed(seed + b)  # same batch, same seed: a resumed batch reproduces itself
            for s, messages in zip(batch, _answer_turn_by_turn(generator, batch)):
                if messages is not None and s.sample_id not in done:
                    done[s.sample_id] = messages
                    f.write(json.dumps({"id": s.sample_id, "messages": messages}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress.update(len(batch))
    out = []
    for s in samples:
        if s.messages is None:
            out.append(s)
        elif s.sample_id in done:
            out.append(Sample(s.sample_id, s.index, s.source, messages=done[s.sample_id]))
        else:
            failed += 1
    return out, failed


def _read_done(path: Path) -> dict[str, list[dict]]:
    """Completed rows of an earlier attempt; a torn last line (killed mid-write) is ignored."""
    done: dict[str, list[dict]] = {}
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # drop the torn tail so appends start on a fresh line
            data = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
        for line in data.decode("utf-8").split("\n"):  # not splitlines(): U+2028 may sit inside a JSON string
            try:
                row = json.loads(line)
                done.setdefault(row["id"], row["messages"])
            except (json.JSONDecodeError, KeyError):
                continue
    return done
