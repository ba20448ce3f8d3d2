"""The data stage: input rows -> (regeneration) -> target forward -> cache shards -> manifest.

Work is split into shards of ``cache.samples_per_shard`` consecutive input rows; shard k belongs
to rank ``k % world_size``. Because a shard's content depends only on its rows (never on the
number of ranks), a 2-rank build writes the same bytes as a 1-rank build, and a build can resume
with any number of ranks: shards already on disk (complete by construction, see shards.py) are
skipped. Per shard:

1. parse its rows (malformed rows are recorded with file:line),
2. regenerate the answers (optional, resumable by sample id),
3. render with the chat template, mask assistant tokens, drop samples with too few loss tokens,
4. run the target in length-sorted batches and hand the outputs to a writer thread
   (bounded queue: the next forward pass overlaps quantization and I/O of the last one),
5. publish the shard and its stats; rank 0 writes manifest.json once all shards exist.
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from deepspec import distributed
from deepspec.config.data import DataStageConfig
from deepspec.data.cache.manifest import FORMAT_VERSION, check_or_write_plan, finalize, stats_name
from deepspec.data.cache.records import RecordCodec, supervised_positions
from deepspec.data.cache.shards import WRITERS, commit_file, shard_name, write_json_atomic
from deepspec.integrity import sha256_file
from deepspec.data.chat import RenderedSample, render_sample
from deepspec.data.regenerate import HFAnswerGenerator, OpenAIAnswerGenerator, regenerate_samples
from deepspec.data.sources import MalformedRow, Sample, file_sha256, iter_raw_rows, parse_row
from deepspec.progress import Progress
from deepspec.target import TargetModel, check_layer_ids, load_tokenizer, target_identity

log = logging.getLogger(__name__)


class MalformedInputError(ValueError):
    """Too many malformed input rows (each is listed in <out_dir>/malformed.jsonl)."""


def make_plan(cfg: DataStageConfig, tokenizer) -> tuple[dict, list[MalformedRow]]:
    """Scan the input once (parsing every row) and fix the settings that determine the cache's bytes."""
    identity = target_identity(cfg.target, tokenizer)
    check_layer_ids(cfg.target.layer_ids, identity.num_hidden_layers)
    num_rows, malformed = 0, []
    for raw in iter_raw_rows(cfg.input):
        num_rows += 1
        parsed = parse_row(raw)
        if isinstance(parsed, MalformedRow):
            malformed.append(parsed)
    regen = asdict(cfg.regenerate) if cfg.regenerate.enabled else None
    if regen:
        regen.pop("url")  # where answers come from may move; how they are sampled may not
    plan = {
        "format_version": FORMAT_VERSION,
        "format": cfg.cache.format,
        "target": asdict(identity),
        "layer_ids": list(cfg.target.layer_ids),
        "num_layers": len(cfg.target.layer_ids),
        "hidden_size": identity.hidden_size,
        "storage_dtype": cfg.cache.storage_dtype,
        "topk_logprobs": cfg.cache.topk_logprobs,
        "final_hidden_positions": "supervised (p with loss_mask[p+1] = 1)",
        "chat_template": tokenizer.chat_template,
        "max_length": cfg.max_length,
        "min_loss_tokens": cfg.min_loss_tokens,
        "regenerate": regen,
        "sources": [{"path": p, "sha256": file_sha256(p)} for p in cfg.input.paths]
                   + ([{"dataset": cfg.input.dataset, "split": cfg.input.split}] if cfg.input.dataset else []),
        "max_rows": cfg.input.max_rows,
        "num_rows": num_rows,
        "samples_per_shard": cfg.cache.samples_per_shard,
        "num_shards": -(-num_rows // cfg.cache.samples_per_shard),
    }
    return plan, malformed


def check_malformed(cfg: DataStageConfig, out_dir: Path, malformed: list[MalformedRow], num_rows: int, rank: int) -> None:
    if not malformed:
        return
    if rank == 0:
        with open(out_dir / "malformed.jsonl", "w") as f:
            for m in malformed:
                f.write(json.dumps(asdict(m)) + "\n")
    listing = "\n  ".join(map(str, malformed[:20])) + ("\n  ..." if len(malformed) > 20 else "")
    msg = f"{len(malformed)} of {num_rows} input rows are malformed (all listed in {out_dir / 'malformed.jsonl'}):\n  {listing}"
    if len(malformed) > cfg.input.max_malformed_fraction * num_rows:
        raise MalformedInputError(msg + f"\nthat is more than input.max_malformed_fraction={cfg.input.max_malformed_fraction}")
    log.warning(msg)


class ShardWriterThread:
    """Encodes and writes records on a background thread; ``put`` blocks when the queue is full."""

    def __init__(self, writer, codec: RecordCodec, maxsize: int):
        self.writer, self.codec = writer, codec
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.stats = {"samples": 0, "tokens": 0, "loss_tokens": 0, "supervised_positions": 0}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (batch := self.queue.get()) is not None:
            if self.error is None:
                try:
                    for item in batch:
                        rec = self.codec.encode(*item)
                        self.writer.write(rec)
                        self.stats["samples"] += 1
                        self.stats["tokens"] += rec.num_tokens
                        self.stats["loss_tokens"] += int(rec.loss_mask.sum())
                        self.stats["supervised_positions"] += len(supervised_positions(rec.loss_mask))
                except BaseException as e:  # surfaced in close(); keep draining so put() never blocks
                    self.error = e

    def put(self, batch: list[tuple]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(batch)

    def abort(self) -> None:
        """Stop the thread after a failure upstream; the unpublished temporary shard is left to be overwritten."""
        self.error = self.error or RuntimeError("aborted")
        self.queue.put(None)
        self.thread.join()

    def close(self) -> dict:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.writer.finish()
        return self.stats


def forward_batches(target: TargetModel, rendered: list[RenderedSample], batch_size: int, topk: int):
    """Yield lists of encode() argument tuples, one list per forward pass (length-sorted batches)."""
    order = sorted(range(len(rendered)), key=lambda i: (-len(rendered[i].input_ids), i))
    dev = target.device
    for b in range(0, len(order), batch_size):
        batch = [rendered[i] for i in order[b : b + batch_size]]
        lengths = [len(r.input_ids) for r in batch]
        ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # (B, S) right-padded
        attn = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, : lengths[i]], attn[i, : lengths[i]] = r.input_ids, 1
        layer_hidden, final_hidden = target(ids.to(dev), attn.to(dev))  # (B, S, L*d), (B, S, d)
        items = []
        for i, r in enumerate(batch):
            n = lengths[i]
            topk_out = None
            if topk:
                pos = supervised_positions(r.loss_mask).to(dev)
                logp = torch.log_softmax(target.logits(final_hidden[i, pos]).float(), dim=-1)  # (P, V)
                vals, idx = logp.topk(topk, dim=-1)
                topk_out = (idx.cpu(), vals.cpu())
            items.append((r.sample_id, r.input_ids, r.loss_mask, layer_hidden[i, :n].cpu(), final_hidden[i, :n].cpu(), topk_out))
        yield items


def build_shard(cfg: DataStageConfig, plan: dict, index: int, samples: list[Sample], malformed: list[MalformedRow],
                target: TargetModel, tokenizer, out_dir: Path, show: bool) -> None:
    """One shard: (regenerate its answers) -> target forward -> write; ``show`` = progress for each phase."""
    regen_failed, name = 0, f"shard {index + 1}/{plan['num_shards']}"
    if cfg.regenerate.enabled:
        (out_dir / "regenerated").mkdir(exist_ok=True)
        done_path = out_dir / "regenerated" / f"shard-{index:06d}.jsonl"
        bar = Progress(sum(s.messages is not None for s in samples), "sample", f"{name}: regenerate", show)
        gen = (HFAnswerGenerator(target.model, tokenizer, cfg.regenerate, bar) if cfg.regenerate.backend == "hf"
               else OpenAIAnswerGenerator(cfg.regenerate, cfg.regenerate.server_model or cfg.target.name_or_path))
        samples, regen_failed = regenerate_samples(samples, gen, done_path, cfg.regenerate.batch_size,
                                                   seed=cfg.regenerate.seed * 1_000_003 + index * 10_007, progress=bar)
        bar.close()
    rendered, dropped = [], 0
    for s in samples:
        r = render_sample(tokenizer, s, cfg.max_length)
        if r.loss_tokens < cfg.min_loss_tokens:
            dropped += 1
        else:
            rendered.append(r)
    codec = RecordCodec(plan["storage_dtype"], plan["num_layers"], plan["hidden_size"], plan["topk_logprobs"])
    path = out_dir / shard_name(index, plan["format"])
    writer = WRITERS[plan["format"]](path, {k: plan[k] for k in ("format_version", "storage_dtype", "num_layers", "hidden_size", "topk_logprobs", "layer_ids")},
                                     rows_per_row_group=cfg.cache.rows_per_row_group, compression=cfg.cache.compression)
    thread = ShardWriterThread(writer, codec, cfg.cache.write_queue_batches)
    bar = Progress(len(rendered), "row", f"{name}: target forward", show)
    try:
        for items in forward_batches(target, rendered, cfg.batch_size, plan["topk_logprobs"]):
            thread.put(items)
            bar.update(len(items), tokens=sum(len(i[1]) for i in items))
        stats = thread.close()
    except BaseException as e:
        thread.abort()
        writer.tmp.unlink(missing_ok=True)  # never leave a partial shard taking the space a rerun needs
        if isinstance(e, OSError) and not e.filename:  # pyarrow's write errors do not say which file
            raise OSError(e.errno, e.strerror or str(e), str(writer.tmp)) from e
        raise
    bar.close()
    # Stats go to disk before the shard is published: a shard under its final name always has them.
    stats.update(index=index, file=path.name, rows=len(samples) + len(malformed) + regen_failed, dropped_short=dropped,
                 regenerate_failed=regen_failed, malformed=[asdict(m) for m in malformed],
                 bytes=writer.tmp.stat().st_size, sha256=sha256_file(writer.tmp))
    write_json_atomic(out_dir / stats_name(index), stats)
    commit_file(writer.tmp, path)


def _shard_rows(cfg: DataStageConfig, wanted: set[int]):
    """Stream the input once, yielding (shard index, samples, malformed rows) for the wanted shards."""
    n = cfg.cache.samples_per_shard
    rows = (raw for raw in iter_raw_rows(cfg.input) if raw.index // n in wanted)
    for index, group in itertools.groupby(rows, key=lambda raw: raw.index // n):
        parsed = [parse_row(raw) for raw in group]
        yield (index, [p for p in parsed if isinstance(p, Sample)], [p for p in parsed if isinstance(p, MalformedRow)])


def independent_part() -> tuple[int, int] | None:
    """(part, parts) when this process is one of several *uncoordinated* workers on one cache:
    a Slurm job array task, one task of a multi-task ``srun`` step, or DEEPSPEC_PART/DEEPSPEC_PARTS
    set by hand. None under torchrun (RANK set), which coordinates through a process group.

    An array of multi-task jobs gives each (array task, srun task) pair its own part.
    """
    import os

    env = os.environ
    if "DEEPSPEC_PARTS" in env:
        return int(env["DEEPSPEC_PART"]), int(env["DEEPSPEC_PARTS"])
    if "RANK" in env:
        return None
    part, parts = 0, 1
    if "SLURM_ARRAY_TASK_ID" in env:
        part, parts = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env["SLURM_ARRAY_TASK_COUNT"])
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", 1))  # set inside an srun step only (not in the batch script)
    if tasks > 1:
        part, parts = part * tasks + int(env["SLURM_PROCID"]), parts * tasks
    return (part, parts) if parts > 1 else None


def build_cache(cfg: DataStageConfig) -> dict | None:
    """Build (or resume) the cache in ``cfg.out_dir``. Returns the manifest where it was written, else None.

    torchrun ranks coordinate through a process group and rank 0 writes the manifest. Independent
    parts (a Slurm job array; see ``independent_part``) share nothing but the directory: each writes
    the same plan atomically, builds its shards, and whichever part finds every shard present
    writes the (identical, atomically replaced) manifest.
    """
    part = independent_part()
    if part is None:
        distributed.init_process_group()
        rank, world = distributed.rank_and_world()
    else:
        rank, world = part
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.target)
    plan, malformed = make_plan(cfg, tokenizer)
    check_malformed(cfg, out_dir, malformed, plan["num_rows"], rank)
    check_or_write_plan(out_dir, plan, write=rank == 0 or part is not None)
    distributed.barrier()
    check_or_write_plan(out_dir, plan, write=False)  # every rank agrees with what rank 0 wrote
    mine = [k for k in range(plan["num_shards"]) if k % world == rank]
    todo = {k for k in mine if not (out_dir / shard_name(k, plan["format"])).exists()}
    if part is not None:
        log.info("part %d of %d: shards %s of %d", rank, world, mine, plan["num_shards"])
    if len(todo) < len(mine):
        log.warning("rank %d: resuming, %d of my %d shards are already complete", rank, len(mine) - len(todo), len(mine))
    if todo:
        target = TargetModel.from_config(cfg.target)
        n = cfg.cache.samples_per_shard
        my_rows = sum(min(n, plan["num_rows"] - k * n) for k in todo)
        log.info("rank %d: %d shards (%d rows) to build%s", rank, len(todo), my_rows,
                 ", regenerating answers first" if cfg.regenerate.enabled else "")
        for index, samples, bad in _shard_rows(cfg, todo):
            build_shard(cfg, plan, index, samples, bad, target, tokenizer, out_dir, cfg.progress and rank == 0)
    if part is not None:
        done = all((out_dir / shard_name(k, plan["format"])).exists() for k in range(plan["num_shards"]))
        if not done:
            log.warning("part %d of %d done; the manifest is written by the part that finishes last "
                        "(or run `deepspec-data finalize out_dir=%s`)", rank, world, out_dir)
        return finalize(out_dir) if done else None
    distributed.barrier()
    manifest = finalize(out_dir) if rank == 0 else None
    distributed.destroy_process_group()
    return manifest
