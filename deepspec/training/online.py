"""Online mode: the target runs on the fly instead of a cache being read.

For users who cannot store a cache (tens of TB at scale): each rank holds the frozen target and
turns its share of the input rows (row index % world == rank) into exactly the per-sample dict the
cache reader yields, through the data stage's own parsing, chat rendering and target forward. The
features are rounded to the target's dtype as a bf16/fp16 cache would store them, so an online
step and an offline step on the same sample compute the same loss.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import IterableDataset

from deepspec.config.train import TrainStageConfig
from deepspec.data.cache.reader import buffered_shuffle
from deepspec.data.cache.records import supervised_positions
from deepspec.data.chat import render_sample
from deepspec.data.sources import Sample, iter_raw_rows, parse_row
from deepspec.target import TargetModel, load_tokenizer


class OnlineTargetDataset(IterableDataset):
    def __init__(self, cfg: TrainStageConfig, rank: int, world: int, shuffle_buffer: int = 64, forward_batch: int = 4):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.shuffle_buffer, self.forward_batch = shuffle_buffer, forward_batch
        self.tokenizer = load_tokenizer(cfg.target)
        self.target: TargetModel | None = None  # loaded on first use (in the process that iterates)
        self.epoch, self.skip_batches, self.batch_size = 0, 0, 1
        self._len = sum(1 for raw in iter_raw_rows(cfg.input) if isinstance(parse_row(raw), Sample))

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1, earlier: list | tuple = ()) -> None:
        if earlier:
            raise ValueError("online training resumes on the number of ranks its checkpoint was written with "
                             "(elastic resume replays a cache's streams; there is no cache here)")
        self.epoch, self.skip_batches, self.batch_size = epoch, skip_batches, batch_size

    def _rendered(self) -> Iterator:
        for raw in iter_raw_rows(self.cfg.input):
            if raw.index % self.world != self.rank:
                continue
            s = parse_row(raw)
            if isinstance(s, Sample):
                r = render_sample(self.tokenizer, s, self.cfg.max_length)
                if r.loss_tokens >= self.cfg.min_loss_tokens:
                    yield r

    def _shuffled(self) -> Iterator:
        rng = random.Random((self.cfg.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        yield from buffered_shuffle(self._rendered(), self.shuffle_buffer, rng)

    @torch.no_grad()
    def featurize(self, rendered: list) -> list[dict]:
        """Rendered samples -> cache-reader dicts: input_ids, loss_mask (S,), hidden (S, L*d), final_hidden (S, d)."""
        if self.target is None:
            self.target = TargetModel.from_config(self.cfg.target)
        out = []
        for r in rendered:  # one sample per forward: no padding, so no batch-dependent rounding
            hidden, final = self.target(r.input_ids[None].to(self.target.device))
            out.append({"sample_id": r.sample_id, "input_ids": r.input_ids, "loss_mask": r.loss_mask,
                        "hidden": hidden[0].float().cpu(), "final_hidden": final[0].float().cpu(),
                        "final_positions": supervised_positions(r.loss_mask)})  # the cache's rows: the same loss online
        return out

    def __iter__(self) -> Iterator[dict]:
        skip = self.skip_batches * self.batch_size
        pending = []
        for i, r in enumerate(self._shuffled()):
            if i < skip:  # resume: passed over without running the target
                continue
            pending.append(r)
            if len(pending) == self.forward_batch:
                yield from self.featurize(pending)
                pending = []
        yield from self.featurize(pending)
