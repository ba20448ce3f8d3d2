"""Weights & Biases for the three stages, and a reader for offline run files.

Every stage opens at most one run (on rank 0 / the part that writes the manifest) with
``start_wandb_run``: job type = the stage, group = the pipeline (``wandb.group``), and an id
derived from the output directory, so a requeued training job appends to its own run instead of
starting a new one.

``read_offline_run`` reads back what an offline run logged, without a server: wandb writes no
JSON summary offline, only ``run-<id>.wandb``, a LevelDB-log framed stream of
``wandb_internal_pb2.Record`` protobufs (32 KiB blocks; each chunk has a 7-byte header: crc32,
length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). The format belongs to the pinned wandb
version (pyproject.toml); the tests check this reader against the trainer's own metrics.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

from deepspec.config.base import WandbConfig

log = logging.getLogger(__name__)


def run_name(cfg: WandbConfig, stage: str, out_dir: Path) -> str:
    return cfg.name or (f"{cfg.group}-{stage}" if cfg.group else Path(out_dir).resolve().name)


def start_wandb_run(cfg: WandbConfig, stage: str, out_dir: str | Path, config: dict | None = None):
    """A wandb run for ``stage`` (data | train | eval) writing under ``out_dir/wandb``; None when disabled."""
    if cfg.mode == "disabled":
        return None
    import wandb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run_name(cfg, stage, out_dir)
    # Same output directory -> same id: a resumed/requeued job continues its run (resume="allow").
    run_id = f"{name}-{hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:8]}".replace("/", "-")
    return wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=stage, name=name, id=run_id,
                      mode=cfg.mode, dir=str(out_dir), config=config, resume="allow")


def offline_run_files(out_dir: str | Path) -> list[Path]:
    """The offline run files under ``out_dir/wandb`` (one per wandb.init), oldest first."""
    return sorted(Path(out_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)


def _records(path: Path):
    """Yield the raw protobuf payloads of a LevelDB-log framed file."""
    data = path.read_bytes()
    block, pos, pending = 32768, 0, b""
    # wandb writes its own 7-byte file header (":W&B" magic, version) before the first block's records.
    if data[:4] == b":W&B":
        pos = 7
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer too small for a header: zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # padding
            pos += room
            continue
        if pos + 7 + length > len(data):  # the writer is still appending this record
            return
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")


def _item_value(item) -> Any:
    return json.loads(item.value_json) if item.value_json else None


def read_offline_run(path: str | Path, wait_for_exit_s: float = 30.0) -> dict:
    """-> {"run": {...}, "config": {...}, "history": [{"_step": s, key: value, ...}], "summary": {...},
    "exit_code": int | None}.

    ``run.finish()`` (and even the end of the logging process) can return before wandb's service
    process has written the last history row and the ``exit`` record, so this re-reads the file
    until the ``exit`` record is there, for at most ``wait_for_exit_s`` seconds. A run that never
    finished (killed) reads as what was written, with ``exit_code`` None.
    """
    deadline = time.monotonic() + wait_for_exit_s
    while True:
        out = _parse_offline_run(Path(path))
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _parse_offline_run(path: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"run": {}, "config": {}, "history": [], "summary": {}, "exit_code": None}
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"id": rec.run.run_id, "name": rec.run.display_name, "group": rec.run.run_group,
                          "job_type": rec.run.job_type, "project": rec.run.project}
            for item in rec.run.config.update:
                out["config"][item.key] = _item_value(item)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = _item_value(item)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = _item_value(item)
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = _item_value(item)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out
