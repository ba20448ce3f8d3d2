"""The trainer: builds the drafter, data, DeepSpeed engine, checkpoints and logger, then runs the
loop. Each piece lives in its own module; this file only wires them and holds the loop.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from deepspec import distributed
from deepspec.config.base import ConfigError
from deepspec.config.train import TrainStageConfig, check_draft_vocab, drafter_config
from deepspec.drafters import DRAFTERS
from deepspec.drafters.draft_vocab import DraftVocab
from deepspec.target import load_frozen_embeddings, target_identity
from deepspec.training.checkpoint import CheckpointManager, saved_trainer_states
from deepspec.training.data import DataPosition, EpochBatches, build_datasets, collate
from deepspec.training.engine import build_engine, gradient_accumulation
from deepspec.training.metrics_log import MetricSums, MetricsLogger
from deepspec.training.preemption import StopRequest
from deepspec.training.step import DrafterWithLoss, anchor_seed

log = logging.getLogger(__name__)
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"


def build_drafter(cfg: TrainStageConfig, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The drafter named by ``cfg.drafter`` over the target's frozen embedding and LM head (and, with
    ``drafter.draft_vocab_size``, its own LM head over the draft vocabulary, ``draft_vocabulary``)."""
    from transformers import AutoConfig

    from deepspec.target import resolve_target_path

    dcfg = drafter_config(dict(cfg.drafter))
    dcfg.target_layer_ids = list(cfg.target.layer_ids)
    if hasattr(dcfg, "mask_token_id"):
        if cfg.target.mask_token_id is None:
            raise ValueError("target.mask_token_id must be set for block drafters (an unused vocabulary id)")
        dcfg.mask_token_id = cfg.target.mask_token_id
    tc = AutoConfig.from_pretrained(resolve_target_path(cfg.target.name_or_path))
    tc = getattr(tc, "text_config", None) or tc
    check_draft_vocab(cfg.drafter, tc.vocab_size)
    vocab = draft_vocabulary(cfg, tc.vocab_size)
    embed, head = load_frozen_embeddings(cfg.target, device, torch.float32)
    spec = DRAFTERS[cfg.drafter["name"]]
    torch.manual_seed(cfg.seed)
    return spec.model_class(dcfg, tc, embed, head, vocab).to(device), spec.kind


def draft_vocabulary(cfg: TrainStageConfig, vocab_size: int) -> DraftVocab | None:
    """None (full vocabulary), the map file ``drafter.draft_vocab_file``, or the ``drafter.draft_vocab_size``
    most frequent labels of the cache's training split (every rank counts its share; the sums are equal on all)."""
    size, file = cfg.drafter.get("draft_vocab_size"), cfg.drafter.get("draft_vocab_file")
    if size is None:
        return None
    if file:
        vocab = DraftVocab.load(file, vocab_size)
        if vocab.size != size:
            raise ConfigError(f"invalid configuration:\n  - drafter.draft_vocab_file={file} maps {vocab.size} tokens, "
                              f"drafter.draft_vocab_size={size}")
        return vocab
    from deepspec.data.cache.token_counts import supervised_token_counts

    rank, world = distributed.rank_and_world()
    counts = supervised_token_counts(cfg.cache_dir, vocab_size, cfg.eval.val_fraction, rank, world)
    vocab = DraftVocab.from_counts(counts, size)
    covered = float(counts[vocab.draft_ids].sum() / counts.sum().clamp_min(1))
    log.info("draft vocabulary: the %d most frequent of %d tokens cover %.2f%% of the training labels", size, vocab_size, 100 * covered)
    return vocab


def write_run_info(run_dir: Path, cfg: TrainStageConfig, world: int, resumed_from: Path | None) -> None:
    """run_info.json: resolved config, git SHA, Slurm job id, world size, what was resumed."""
    import os
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    info = {"config": asdict(cfg), "git_sha": sha or None, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "world_size": world, "resumed_from": str(resumed_from) if resumed_from else None}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=1, default=str))


class Trainer:
    def __init__(self, cfg: TrainStageConfig):
        distributed.init_process_group(single_process=True)
        self.cfg = cfg
        self.rank, self.world = distributed.rank_and_world()
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.identity = target_identity(cfg.target)
        drafter, kind = build_drafter(cfg, device)
        self.model = DrafterWithLoss(drafter, kind, cfg.loss)
        self.train_set, self.val_set = build_datasets(cfg, self.identity, self.rank, self.world)
        self.accum = gradient_accumulation(cfg, self.world)
        self.total_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * self._train_samples() / cfg.global_batch_size))
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.rank)
        self.step, self.position, self.best_tau = 0, DataPosition(), -1.0
        resume = self.ckpt.resolve(cfg.checkpoint.resume)
        saved = saved_trainer_states(resume) if resume is not None else []
        resized = bool(saved) and len(saved) != self.world
        # ZeRO-1/2/3 partition the optimizer by rank: another rank count loads a universal copy (checkpoint.py)
        universal = self.ckpt.universal_copy(resume) if resized and cfg.deepspeed.zero_stage > 0 else None
        self.engine, self.scheduler = build_engine(self.model, cfg, self.total_steps, self.world, load_universal=universal is not None)
        if resume is not None:
            self.ckpt.load(self.engine, resume, len(saved), universal)
            self.step, self.best_tau = saved[0]["step"], saved[0]["best_tau"]
            self.position = (DataPosition.after_resize(saved, self.world) if resized
                             else DataPosition(**saved[self.rank]["position"]))
            if resized and self.rank == 0:
                log.warning("RESUME: the checkpoint was written by %d ranks, resuming on %d: the epoch goes on without "
                            "the samples the %d ranks had consumed", len(saved), self.world, len(saved))
        self.batches = EpochBatches(self.train_set, cfg.micro_batch_size, cfg.num_workers, self.position)
        self.logger = MetricsLogger(cfg.logging, cfg.wandb, self.run_dir, self.rank, self.total_steps, self.step, asdict(cfg))
        self.stop = StopRequest()
        if self.rank == 0:
            write_run_info(self.run_dir, cfg, self.world, resume)
            if drafter.d2t is not None:  # the run's draft vocabulary, next to its config (the export carries it too)
                DraftVocab.from_d2t(drafter.d2t.cpu(), len(drafter.t2d)).save(self.run_dir / DRAFT_VOCAB_FILE)
            log.info("drafter %s: %.2fM trainable parameters; %d optimizer steps of %d samples (%d ranks x %d micro x %d accumulation)",
                     cfg.drafter["name"], sum(p.numel() for p in drafter.parameters() if p.requires_grad) / 1e6,
                     self.total_steps, cfg.global_batch_size, self.world, cfg.micro_batch_size, self.accum)

    def _train_samples(self) -> int:
        n = len(self.train_set)
        return int(n * (1 - self.cfg.eval.val_fraction)) if not self.cfg.online else n

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict | None:
        """One optimizer step = ``accum`` micro-batches. Returns reduced metrics on logging steps."""
        sums = MetricSums()
        tokens = 0
        for micro in range(self.accum):
            batch = self._to_device(next(self.batches))
            out = self.engine(batch, anchor_seed(self.cfg.seed, self.step))
            self.engine.backward(out["loss"])
            self.engine.step()
            sums.add(out)
            tokens += int(batch["valid"].sum())
        self.step += 1
        logging_step = self.step % self.cfg.logging.every_steps == 0 or self.step == self.total_steps
        metrics = None
        if logging_step:
            metrics = {**sums.reduce(), "lr": self.scheduler.get_last_lr()[0], "epoch": self.position.epoch}
        self.logger.step(self.step, tokens * self.world, metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out metrics (expected tau from analytic acceptance) on the validation split.

        Every rank runs the same number of forwards (the smallest share over ranks): under ZeRO-3 a
        forward is a collective, and the metric reduction must see the same keys everywhere.
        """
        import itertools

        import torch.distributed as dist

        from deepspec.distributed import cpu_group

        samples = list(itertools.islice(iter(self.val_set), max(1, self.cfg.eval.max_samples // self.world)))
        n = torch.tensor([len(samples)])
        if dist.is_initialized():
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=cpu_group())
        if int(n) == 0:
            return {}
        self.engine.eval()
        sums = MetricSums()
        for sample in samples[: int(n)]:
            sums.add(self.engine(self._to_device(collate([sample])), anchor_seed(self.cfg.seed, -1)))
        self.engine.train()
        return sums.reduce()

    def fit(self) -> dict:
        cfg = self.cfg
        last_eval: dict = {}
        while self.step < self.total_steps:
            self.train_step()
            end = self.step == self.total_steps
            if self.val_set is not None and ((cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0) or end):
                last_eval = self.evaluate()
                self.logger.eval(self.step, last_eval)
                if last_eval.get("expected_tau", -1) > self.best_tau:
                    self.best_tau = last_eval["expected_tau"]
                    self.export(self.run_dir / "best")
            stop = self.stop.requested()  # a collective: every rank decides together
            if self.step % cfg.checkpoint.every_steps == 0 or end or stop:
                self.ckpt.save(self.engine, self.step, {"step": self.step, "best_tau": self.best_tau, "position": asdict(self.position),
                                                        "data_workers": cfg.num_workers, "micro_batch_size": cfg.micro_batch_size})
            if stop and not end:
                log.warning("PREEMPT: stop requested (%s); checkpoint saved at step %d of %d, exiting for a requeue",
                            self.stop.reason(), self.step, self.total_steps)
                self.logger.close()
                distributed.destroy_process_group()
                self.stop.after_checkpoint()
                return {"step": self.step, "preempted": True}
        self.export(Path(cfg.export_dir) if cfg.export_dir else self.run_dir / "export")
        self.logger.close()
        result = {"step": self.step, "best_val_expected_tau": self.best_tau, "last_eval": last_eval}
        if self.rank == 0:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=1))
        distributed.destroy_process_group()
        return result

    def export(self, out_dir: Path) -> None:
        """Write the drafter in the serving layout (rank 0; ZeRO-3 weights gathered first)."""
        from deepspec.export import export_drafter, gathered_state_dict

        state = gathered_state_dict(self.engine)
        if self.rank == 0:
            export_drafter(self.model.drafter, out_dir, state_dict={k.removeprefix("drafter."): v for k, v in state.items()},
                           target=self.cfg.target)
