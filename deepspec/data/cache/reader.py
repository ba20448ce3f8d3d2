"""TargetCacheDataset: stream a finished cache into training, sharded by rank and worker.

The unit of work is a Parquet row group (or a whole tar shard for WebDataset). Each epoch the
units are shuffled with ``seed + epoch`` and dealt round-robin to (rank, dataloader worker);
records within a unit pass through a bounded shuffle buffer. Only the units in flight are in
memory, and a background thread decodes ``prefetch`` samples ahead of the consumer.

The manifest is checked against the configured target before anything is read: a cache built
for another model (config, tokenizer, weights, hidden size or layer ids) is refused with the
differences.

``split`` keeps a stable subset: a sample is in "val" when the hash of its sample id falls under
``val_fraction``, else in "train"; the split survives re-sharding and rebuilding. ``set_epoch(e,
skip)`` resumes mid-epoch: the first ``skip`` samples of this rank/worker's stream are passed over
without being decoded (the shuffle buffer holds undecoded records).

Elastic resume (a run checkpointed on N ranks continues on M): ``set_epoch(e, skip, batch,
earlier)`` also takes the *segments* of epoch ``e`` that earlier runs streamed with other numbers of
ranks (``StreamSegment``: their world size, workers, micro batch and each rank's batch count). The
samples those segments consumed are replayed (sample ids only, nothing decoded) and left out of this
run's streams, so the epoch goes on with every remaining sample exactly once.
"""
from __future__ import annotations

import hashlib
import queue
import random
import threading
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from deepspec.data.cache.manifest import CacheCorruptError, check_target, load_manifest
from deepspec.data.cache.shards import parquet_row_groups, read_parquet_shard, read_webdataset_shard
from deepspec.data.cache.verify import codec_for, shard_file_problems
from deepspec.target import TargetIdentity


@dataclass(frozen=True)
class StreamSegment:
    """A stretch of one epoch streamed by a run with ``world`` ranks, ``workers`` dataloader workers per
    rank and ``micro_batch_size`` samples per batch; rank r consumed ``batches[r]`` batches of it."""

    world: int
    workers: int
    micro_batch_size: int
    batches: tuple[int, ...]

    def samples_taken(self, rank: int, worker: int) -> int:
        """Samples that (rank, worker) handed out: a DataLoader takes batch i from worker i % workers."""
        return max(0, -(-(self.batches[rank] - worker) // self.workers)) * self.micro_batch_size


class TargetCacheDataset(IterableDataset):
    """Yields dicts of tensors (see ``RecordCodec.decode``) from a cache directory."""

    def __init__(self, cache_dir: str | Path, target: TargetIdentity | None = None, layer_ids: list[int] | None = None,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 64, prefetch: int = 8,
                 rank: int | None = None, world_size: int | None = None, out_dtype: torch.dtype = torch.float32,
                 dense_final: bool = True, split: str | None = None, val_fraction: float = 0.0):
        self.cache_dir = Path(cache_dir)
        self.manifest = load_manifest(self.cache_dir)
        if target is not None:
            check_target(self.manifest, target, layer_ids, self.cache_dir)
        self.codec = codec_for(self.manifest)
        self.seed, self.shuffle, self.shuffle_buffer, self.prefetch = seed, shuffle, shuffle_buffer, prefetch
        self.out_dtype, self.dense_final = out_dtype, dense_final
        self.epoch, self.skip_batches, self.batch_size = 0, 0, 1
        self.excluded: frozenset[str] = frozenset()
        if split not in (None, "train", "val"):
            raise ValueError(f"split={split!r} must be None, 'train' or 'val'")
        self.split, self.val_fraction = split, val_fraction
        if rank is None or world_size is None:
            from deepspec.distributed import rank_and_world

            rank, world_size = rank_and_world()
        self.rank, self.world_size = rank, world_size
        fmt = self.manifest["format"]
        self.shards = {s["file"]: s for s in self.manifest["shards"]}
        self.verified: set[str] = set()  # shards whose checksum this process has checked
        self.units: list[tuple[str, int | None]] = []
        for shard in self.manifest["shards"]:
            if shard["samples"] == 0:
                continue
            if fmt == "parquet":
                try:
                    groups = parquet_row_groups(self.cache_dir / shard["file"])
                except Exception as e:  # noqa: BLE001 -- truncated/garbled footer, missing file: all corruption
                    raise self.corrupt(shard["file"], f"unreadable ({type(e).__name__}: {str(e)[:120]})") from None
                self.units += [(shard["file"], g) for g in range(groups)]
            else:
                self.units.append((shard["file"], None))

    def corrupt(self, file: str, what: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"{self.cache_dir / file}: {what}; the cache is corrupt. `deepspec-data verify out_dir={self.cache_dir}` lists "
            f"every bad shard; delete them and rerun the build: it rebuilds only the missing shards.")

    def check_shard(self, file: str) -> None:
        """Before this process first reads a shard: its size and sha256 equal the manifest's (a flipped
        byte would otherwise become silently wrong training data)."""
        if file in self.verified:
            return
        problems = shard_file_problems(self.cache_dir / file, self.shards[file])
        if problems:
            raise self.corrupt(file, "; ".join(problems))
        self.verified.add(file)

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1,
                  earlier: list[StreamSegment] | tuple = ()) -> None:
        """Next iteration is epoch ``epoch``, resuming after this rank consumed ``skip_batches`` batches
        of this run's stream; ``earlier``: segments of this epoch streamed by runs with other rank
        counts, whose samples this run's streams leave out (elastic resume).

        A DataLoader with W workers takes batch i from worker i % W, so worker w skips the samples of
        the batches it had produced (exact while no worker's stream has run out before the others).
        """
        self.epoch, self.skip_batches, self.batch_size = epoch, skip_batches, batch_size
        self.excluded = self.consumed_ids(list(earlier))

    def consumed_ids(self, segments: list[StreamSegment]) -> frozenset[str]:
        """Sample ids that ``segments`` (in order) consumed in the current epoch: each segment's streams are
        replayed as that run saw them (its own world size and workers, minus what came before it)."""
        consumed: frozenset[str] = frozenset()
        for seg in segments:
            taken = set()
            for rank in range(seg.world):
                for worker in range(seg.workers):
                    stream = self._stream(rank, seg.world, worker, seg.workers, consumed)
                    taken.update(rec.sample_id for rec in islice(stream, seg.samples_taken(rank, worker)))
            consumed = consumed | taken
        return consumed

    def in_split(self, sample_id: str) -> bool:
        if self.split is None:
            return True
        is_val = int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16) < self.val_fraction * 2**32
        return is_val == (self.split == "val")

    def __len__(self) -> int:
        """Samples in the whole cache (all ranks together)."""
        return self.manifest["counts"]["samples"]

    def _my_units(self, rank: int, world: int, worker: int, workers: int) -> list[tuple[str, int | None]]:
        units = list(self.units)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(units)
        return units[rank * workers + worker :: world * workers]

    def _records(self, rank: int, world: int, worker: int, workers: int, excluded: frozenset[str]) -> Iterator:
        for file, group in self._my_units(rank, world, worker, workers):
            self.check_shard(file)
            path = self.cache_dir / file
            records = read_webdataset_shard(path) if group is None else read_parquet_shard(path, [group])
            yield from (r for r in records if self.in_split(r.sample_id) and r.sample_id not in excluded)

    def _stream(self, rank: int, world: int, worker: int, workers: int, excluded: frozenset[str]) -> Iterator:
        """The undecoded records that (rank, worker) of a ``world``-rank run streams this epoch, in order."""
        records = self._records(rank, world, worker, workers, excluded)
        if not self.shuffle:
            return records
        rng = random.Random(((self.seed * 1_000_003 + self.epoch) * 1009 + rank) * 131 + worker)
        return buffered_shuffle(records, self.shuffle_buffer, rng)

    def _samples(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        skip = max(0, -(-(self.skip_batches - wid) // nw)) * self.batch_size
        for i, rec in enumerate(self._stream(self.rank, self.world_size, wid, nw, self.excluded)):
            if i >= skip:  # records before the resume point are passed over undecoded
                yield self.codec.decode(rec, self.out_dtype, self.dense_final)

    def __iter__(self) -> Iterator[dict]:
        if self.prefetch <= 0:
            yield from self._samples()
            return
        yield from _prefetched(self._samples(), self.prefetch)


def buffered_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Stream ``items`` through a buffer of ``size``, emitting a random buffered item each time it fills."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def _prefetched(it: Iterator, depth: int) -> Iterator:
    """Run ``it`` on a background thread, ``depth`` items ahead (decoding overlaps the consumer)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():  # a consumer that stopped early must not leave this thread blocked
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in it:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
