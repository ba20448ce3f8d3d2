"""Shard files of the target cache: Parquet and WebDataset writers and readers.

Both writers write to ``<name>.tmp``; ``finish()`` closes it and ``commit_file`` fsyncs, renames
and fsyncs the directory, so a shard on disk under its final name is always complete. Both are deterministic (no timestamps), so the same
records give the same bytes and therefore the same sha256.

Parquet: one row per sample. ``input_ids``/``loss_mask`` are list columns any Parquet tool reads;
hidden states are binary blobs whose layout the file's key-value metadata describes.
WebDataset: one tar entry per field, ``<key>.<field>``, key = ``s<row index in shard>``; the
manifest (not the tar) holds the layout.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from deepspec.data.cache.records import CacheRecord

BLOB_FIELDS = ("hidden", "hidden_scale", "final_hidden", "final_scale", "topk_ids", "topk_logprobs")
PARQUET_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("num_tokens", pa.int32()), ("input_ids", pa.list_(pa.int32())),
     ("loss_mask", pa.list_(pa.uint8()))] + [(f, pa.binary()) for f in BLOB_FIELDS]
)
SHARD_SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX[fmt]}"


def commit_file(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it to ``final`` and fsync the directory (atomic publish)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, obj) -> None:
    # A tmp name of this process's own: independent parts (Slurm array tasks) write plan.json and
    # manifest.json concurrently; each publishes a complete, identical file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        commit_file(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class ParquetShardWriter:
    """Streams records into one Parquet shard, ``rows_per_row_group`` samples per row group."""

    def __init__(self, path: Path, metadata: dict, rows_per_row_group: int = 32, compression: str = "zstd"):
        self.path, self.tmp = Path(path), Path(str(path) + ".tmp")
        schema = PARQUET_SCHEMA.with_metadata({"deepspec": json.dumps(metadata, sort_keys=True)})
        self._writer = pq.ParquetWriter(self.tmp, schema, compression=None if compression == "none" else compression,
                                        use_dictionary=["sample_id"], write_statistics=["sample_id", "num_tokens"])
        self._rows: list[CacheRecord] = []
        self._group = rows_per_row_group

    def write(self, rec: CacheRecord) -> None:
        self._rows.append(rec)
        if len(self._rows) >= self._group:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        cols = {"sample_id": [r.sample_id for r in self._rows], "num_tokens": [r.num_tokens for r in self._rows],
                "input_ids": [r.input_ids for r in self._rows], "loss_mask": [r.loss_mask for r in self._rows]}
        cols.update({f: [getattr(r, f) for r in self._rows] for f in BLOB_FIELDS})
        self._writer.write_table(pa.Table.from_pydict(cols, schema=self._writer.schema))
        self._rows = []

    def finish(self) -> Path:
        """Close the temporary file and return it; ``commit_file(tmp, path)`` publishes it."""
        self._flush()
        self._writer.close()
        return self.tmp


class WebDatasetShardWriter:
    """Streams records into one WebDataset tar shard (fixed mtime/owner so bytes are reproducible)."""

    def __init__(self, path: Path, metadata: dict, **_):
        self.path, self.tmp = Path(path), Path(str(path) + ".tmp")
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, user="deepspec", group="deepspec", mtime=0.0, encoder=False)
        self._n = 0

    def write(self, rec: CacheRecord) -> None:
        sample = {"__key__": f"s{self._n:07d}",
                  "json": json.dumps({"sample_id": rec.sample_id, "num_tokens": rec.num_tokens}).encode(),
                  "input_ids": rec.input_ids.astype("<i4").tobytes(),
                  "loss_mask": rec.loss_mask.astype(np.uint8).tobytes()}
        sample.update({f: getattr(rec, f) for f in BLOB_FIELDS})
        self._tar.write(sample)
        self._n += 1

    def finish(self) -> Path:
        """Close the temporary file and return it; ``commit_file(tmp, path)`` publishes it."""
        self._tar.close()
        self._file.close()
        return self.tmp


WRITERS = {"parquet": ParquetShardWriter, "webdataset": WebDatasetShardWriter}


# ---------------------------------------------------------------------------- reading
def parquet_row_groups(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_row_groups


def read_parquet_shard(path: Path, row_groups: list[int] | None = None) -> Iterator[CacheRecord]:
    """Yield the records of a Parquet shard, one row group in memory at a time."""
    f = pq.ParquetFile(path)
    for g in range(f.metadata.num_row_groups) if row_groups is None else row_groups:
        t = f.read_row_group(g).to_pydict()
        for i in range(len(t["sample_id"])):
            yield CacheRecord(
                t["sample_id"][i], np.asarray(t["input_ids"][i], dtype=np.int32),
                np.asarray(t["loss_mask"][i], dtype=np.uint8), *(t[f][i] for f in BLOB_FIELDS))


def read_webdataset_shard(path: Path) -> Iterator[CacheRecord]:
    """Yield the records of a WebDataset tar shard, in file order."""
    # No node/worker splitting here: the reader already gave this file to exactly one (rank, worker).
    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None):
        missing = [f for f in ("json", "input_ids", "loss_mask", *BLOB_FIELDS) if f not in sample]
        if missing:
            raise ValueError(f"tar entry {sample.get('__key__')} lacks fields {missing}")
        meta = json.loads(sample["json"])
        yield CacheRecord(meta["sample_id"], np.frombuffer(sample["input_ids"], dtype="<i4").copy(),
                          np.frombuffer(sample["loss_mask"], dtype=np.uint8).copy(),
                          *(bytes(sample[f]) for f in BLOB_FIELDS))


def read_shard(path: Path, fmt: str) -> Iterator[CacheRecord]:
    return read_parquet_shard(path) if fmt == "parquet" else read_webdataset_shard(path)
