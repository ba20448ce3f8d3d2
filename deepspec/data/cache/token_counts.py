"""How often each token is a training label in a cache: what a reduced draft vocabulary is chosen from.

A label is a loss-masked token with a position before it (``input_ids[p + 1]`` where
``loss_mask[p + 1]``): exactly the tokens the drafters are trained to predict. Each rank counts
its share of the cache's units (Parquet row groups, WebDataset shards) and the counts are summed
over ranks, so every rank ends with the same (V,) int64 vector and chooses the same map.
Parquet is read column-wise (input_ids and loss_mask only), never the hidden states.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from deepspec.data.cache.reader import TargetCacheDataset
from deepspec.data.cache.shards import read_webdataset_shard


def _labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """(S,), (S,) -> the supervised next tokens (P,)."""
    return np.asarray(input_ids)[1:][np.asarray(loss_mask)[1:] != 0]


def supervised_token_counts(cache_dir: str | Path, vocab_size: int, val_fraction: float = 0.0,
                            rank: int = 0, world: int = 1) -> torch.Tensor:
    """(V,) int64 label counts over the training split of the cache (the samples ``val_fraction`` leaves for training).

    Shard checksums are not re-read here (that would read every byte of the cache once more); the training
    reader checks each shard before it trains on it.
    """
    ds = TargetCacheDataset(cache_dir, shuffle=False, prefetch=0, rank=rank, world_size=world,
                            split="train" if val_fraction else None, val_fraction=val_fraction)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for file, group in ds.units[rank::world]:
        path = ds.cache_dir / file
        if group is None:
            rows = ((r.sample_id, r.input_ids, r.loss_mask) for r in read_webdataset_shard(path))
        else:
            t = pq.ParquetFile(path).read_row_group(group, columns=["sample_id", "input_ids", "loss_mask"]).to_pydict()
            rows = zip(t["sample_id"], t["input_ids"], t["loss_mask"])
        for sample_id, ids, mask in rows:
            if ds.in_split(sample_id):
                labels = _labels(ids, mask)
                if labels.size and (labels.min() < 0 or labels.max() >= vocab_size):
                    raise ValueError(f"{path}: sample {sample_id} has token ids outside the target's vocabulary of {vocab_size}")
                counts += np.bincount(labels, minlength=vocab_size)
    out = torch.from_numpy(counts)
    import torch.distributed as dist

    if dist.is_initialized() and world > 1:
        from deepspec.distributed import cpu_group

        dist.all_reduce(out, group=cpu_group())  # int64 sums: exact, the same on every rank
    return out
