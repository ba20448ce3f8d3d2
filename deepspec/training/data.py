"""Training batches: from the target cache (offline) or from the live target (online), with a
data position that a checkpoint records and a resume restores.

Both sources yield the same per-sample dict (input_ids, loss_mask, hidden, final_hidden) and the
same padded batch (``collate``), so the train step cannot tell them apart.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from deepspec.config.train import TrainStageConfig
from deepspec.data.cache.reader import StreamSegment, TargetCacheDataset


def collate(samples: list[dict]) -> dict:
    """Right-pad samples to the longest: input_ids/loss_mask/valid (B, S), hidden (B, S, L*d),
    final_hidden (B, S, d), final_valid (B, S) where final_hidden is the target's (a sample's ``final_positions``, the
    cache's rows; all real positions without them), and sample_seed (B,) (a hash of the sample id, seeding its anchors)."""
    S = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    out = {
        "input_ids": torch.zeros(B, S, dtype=torch.long),
        "loss_mask": torch.zeros(B, S, dtype=torch.uint8),
        "valid": torch.zeros(B, S, dtype=torch.bool),
        "hidden": torch.zeros(B, S, samples[0]["hidden"].shape[-1], dtype=samples[0]["hidden"].dtype),
        "final_hidden": torch.zeros(B, S, samples[0]["final_hidden"].shape[-1], dtype=samples[0]["final_hidden"].dtype),
        "final_valid": torch.zeros(B, S, dtype=torch.bool),
    }
    out["sample_seed"] = torch.tensor([int(hashlib.sha1(s["sample_id"].encode()).hexdigest()[:15], 16) for s in samples])
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        out["input_ids"][i, :n], out["loss_mask"][i, :n], out["valid"][i, :n] = s["input_ids"], s["loss_mask"], True
        out["hidden"][i, :n], out["final_hidden"][i, :n] = s["hidden"], s["final_hidden"]
        out["final_valid"][i, s["final_positions"] if "final_positions" in s else slice(0, n)] = True
    return out


@dataclass
class DataPosition:
    """Where this rank's stream stands: epoch and micro-batches consumed in it by this run's ranks, after
    the ``earlier`` segments of the same epoch that runs with other rank counts streamed (elastic resume;
    ``StreamSegment`` fields as dicts, so the position stays JSON)."""

    epoch: int = 0
    batches: int = 0
    earlier: list[dict] = field(default_factory=list)

    @staticmethod
    def after_resize(saved: list[dict], world: int) -> "DataPosition":
        """The position a ``world``-rank run starts from, given every rank's saved trainer state of a run
        with another number of ranks: the same epoch, the old run's stretch of it appended to ``earlier``."""
        positions = [s["position"] for s in saved]
        epochs = {p["epoch"] for p in positions}
        if len(epochs) != 1:
            raise ValueError(f"the checkpoint's {len(saved)} ranks stopped in different epochs {sorted(epochs)} "
                             f"(one had finished its share); resume it on {len(saved)} ranks, not {world}")
        layout = {(s.get("data_workers"), s.get("micro_batch_size")) for s in saved}
        workers, micro = layout.pop()
        if layout or workers is None:
            raise ValueError("the checkpoint does not record its data layout (written by an older deepspec): "
                             f"resume it on {len(saved)} ranks, as it was written")
        segment = StreamSegment(world=len(saved), workers=max(1, workers), micro_batch_size=micro,  # 0 workers: one stream
                                batches=tuple(p["batches"] for p in positions))
        return DataPosition(epoch=positions[0]["epoch"], batches=0, earlier=positions[0].get("earlier", []) + [asdict(segment)])

    def segments(self) -> list[StreamSegment]:
        return [StreamSegment(**{**seg, "batches": tuple(seg["batches"])}) for seg in self.earlier]


class EpochBatches:
    """An endless stream of micro-batches over a resumable dataset, epoch after epoch."""

    def __init__(self, dataset: IterableDataset, micro_batch_size: int, num_workers: int, position: DataPosition):
        self.dataset, self.micro, self.workers = dataset, micro_batch_size, num_workers
        self.position = position
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        self.dataset.set_epoch(self.position.epoch, self.position.batches, self.micro, self.position.segments())
        loader = DataLoader(self.dataset, batch_size=self.micro, collate_fn=collate, num_workers=self.workers,
                            persistent_workers=False, prefetch_factor=4 if self.workers else None)
        self._it = iter(loader)

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
                self.position.batches += 1
                return batch
            except StopIteration:
                self._it = None
                self.position.epoch, self.position.batches, self.position.earlier = self.position.epoch + 1, 0, []
        raise RuntimeError("this rank's share of the training split is empty: use fewer ranks or more data")


def build_datasets(cfg: TrainStageConfig, identity, rank: int, world: int) -> tuple[IterableDataset, IterableDataset | None]:
    """(train dataset, validation dataset or None)."""
    if cfg.online:
        from deepspec.training.online import OnlineTargetDataset

        return OnlineTargetDataset(cfg, rank, world), None
    common = dict(target=identity, layer_ids=list(cfg.target.layer_ids), seed=cfg.seed, val_fraction=cfg.eval.val_fraction)
    train = TargetCacheDataset(cfg.cache_dir, rank=rank, world_size=world, split="train" if cfg.eval.val_fraction else None,
                               shuffle_buffer=cfg.shuffle_buffer, **common)
    val = None
    if cfg.eval.val_fraction > 0:
        val = TargetCacheDataset(cfg.cache_dir, rank=rank, world_size=world, split="val", shuffle=False, prefetch=0, **common)
    return train, val
