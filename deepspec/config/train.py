"""Typed configs of the train stage. The drafter's own config lives beside its model
(``deepspec/drafters/<name>.py``); here it is a mapping with a ``name`` key that ``drafter_config``
turns into that dataclass and validates."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from deepspec.config.base import ConfigError, WandbConfig, at_least, one_of
from deepspec.config.data import InputConfig, TargetConfig

DRAFTER_NAMES = ("dspark", "dflash", "eagle3")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay, gradient clipping."""

    lr: float = 6e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (configs/train.yaml: torch's default (0.9, 0.999), as the reference recipe; the toy's (0.9, 0.95))."""
    warmup_ratio: float = 0.04
    """Fraction of the optimizer steps spent in linear warmup."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""

    def problems(self, prefix: str) -> list[str]:
        out = at_least(prefix, "lr", self.lr, 0.0) + at_least(prefix, "grad_clip", self.grad_clip, 0.0)
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(f"{prefix}warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if len(self.betas) != 2:
            out.append(f"{prefix}betas={self.betas} must have two values")
        return out


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed wraps the drafter."""

    zero_stage: int = 2
    """ZeRO stage 0-3."""
    precision: str = "auto"
    """auto (bf16 where the device runs it natively, else fp32; see deepspec/precision.py), bf16 (fp32
    master weights) or fp32 (CPU tests, exact resume)."""
    extra: dict = field(default_factory=dict)
    """Raw DeepSpeed config keys merged last (e.g. zero_optimization.offload_optimizer)."""

    def problems(self, prefix: str) -> list[str]:
        return one_of(prefix, "zero_stage", self.zero_stage, (0, 1, 2, 3)) + one_of(prefix, "precision", self.precision, ("auto", "bf16", "fp32"))


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints with data position and RNG states."""

    every_steps: int = 500
    """Save every N optimizer steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted)."""
    resume: str = "auto"
    """auto (latest in run_dir if any) | never | <path to a checkpoint dir>."""

    def problems(self, prefix: str) -> list[str]:
        return at_least(prefix, "every_steps", self.every_steps, 1) + at_least(prefix, "keep_last", self.keep_last, 1)


@dataclass
class LoggingConfig:
    """Console and JSONL logging (W&B: the stage's ``wandb`` section)."""

    every_steps: int = 10
    """Log metrics every N optimizer steps."""
    progress: bool = True
    """Console progress bar on rank 0."""

    def problems(self, prefix: str) -> list[str]:
        return at_least(prefix, "every_steps", self.every_steps, 1)


@dataclass
class EvalConfig:
    """Periodic held-out evaluation on a validation split of the cache."""

    every_steps: int = 500
    """Evaluate every N optimizer steps (and at the end); 0 = only at the end."""
    val_fraction: float = 0.02
    """Fraction of samples (by sample-id hash) held out from training."""
    max_samples: int = 256
    """Validation samples per evaluation."""

    def problems(self, prefix: str) -> list[str]:
        out = at_least(prefix, "every_steps", self.every_steps, 0) + at_least(prefix, "max_samples", self.max_samples, 1)
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"{prefix}val_fraction={self.val_fraction} must be in [0, 1)")
        return out


@dataclass
class LossConfig:
    """Loss weights (block drafters) and Eagle3's step decay; see deepspec/losses.py."""

    ce_weight: float = 0.1
    """Cross-entropy weight (DFlash uses 1.0 via its preset)."""
    l1_weight: float = 0.9
    """sum |p_d - p_t| weight."""
    confidence_weight: float = 1.0
    """Confidence BCE weight."""
    decay_gamma: float = 4.0
    """Block slot k weighted exp(-k / decay_gamma)."""
    chunk_blocks: int = 32
    """Blocks whose vocabulary logits exist at once."""
    chunk_positions: int = 512
    """Eagle3: positions whose vocabulary logits exist at once."""
    recompute_logits: bool = True
    """Recompute each chunk's vocabulary logits in backward (activation checkpointing): peak memory stays one
    chunk's. false keeps every chunk's logits for backward: a third fewer vocabulary matmuls per step (measured
    1.07 -> see eval/results/README.md), for (blocks x g x V) fp32 activations; right for small vocabularies/CPUs."""


@dataclass
class TrainStageConfig:
    """The train stage: a drafter fitted against a target cache (or the live target)."""

    run_dir: str = "runs/train"
    """Checkpoints, metrics.jsonl, resolved config, exports."""
    cache_dir: Optional[str] = None
    """Target cache from the data stage (offline mode)."""
    online: bool = False
    """Run the target on the fly instead of reading a cache (uses ``input``)."""
    input: InputConfig = field(default_factory=InputConfig)
    """Rows for online mode (same layouts as the data stage)."""
    max_length: int = 1024
    """Online mode: truncate rendered samples to this many tokens (configs/train.yaml: the reference recipe's 4,096)."""
    min_loss_tokens: int = 14
    """Online mode: drop samples with fewer supervised tokens."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The target (its embedding and LM head are the drafter's, frozen)."""
    drafter: dict = field(default_factory=lambda: {"name": "dspark"})
    """Drafter config: ``name`` (dspark | dflash | eagle3) plus that drafter's fields."""
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    micro_batch_size: int = 1
    """Samples per rank per forward pass."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks (= micro x ranks x gradient accumulation). configs/train.yaml sets the
    reference recipe's 512 (configs/recipe/ the toy's 8); this default serves configs built in code."""
    max_steps: int = 0
    """Optimizer steps (0: derive from ``epochs``)."""
    epochs: float = 1.0
    """Passes over the training split when max_steps = 0 (configs/train.yaml: the reference recipe's 10)."""
    seed: int = 0
    """Seed of weights init, data order and anchor sampling."""
    num_workers: int = 0
    """DataLoader workers per rank."""
    shuffle_buffer: int = 64
    """Samples mixed within a rank's stream (row groups are shuffled too); 1 = row-group order only."""
    export_dir: Optional[str] = None
    """Export the final drafter here (default: <run_dir>/export)."""

    def problems(self, prefix: str = "") -> list[str]:
        out = []
        if not self.online and not self.cache_dir:
            out.append(f"{prefix}cache_dir is required unless {prefix}online=true")
        out += at_least(prefix, "max_length", self.max_length, 2) + at_least(prefix, "min_loss_tokens", self.min_loss_tokens, 1)
        out += at_least(prefix, "num_workers", self.num_workers, 0)
        if self.online:
            out += self.input.problems(prefix + "input.")
            if self.num_workers:
                out.append(f"{prefix}num_workers={self.num_workers} with online=true: the target runs in the training "
                           "process; set num_workers=0")
        out += one_of(prefix, "drafter.name", self.drafter.get("name"), DRAFTER_NAMES)
        out += draft_vocab_problems(self.drafter, prefix)
        if self.online and self.drafter.get("draft_vocab_size") is not None and not self.drafter.get("draft_vocab_file"):
            out.append(f"{prefix}drafter.draft_vocab_size with online=true needs {prefix}drafter.draft_vocab_file (a map: "
                       "there is no cache to count the supervised tokens of)")
        out += at_least(prefix, "micro_batch_size", self.micro_batch_size, 1)
        out += at_least(prefix, "global_batch_size", self.global_batch_size, 1)
        if self.micro_batch_size >= 1 and self.global_batch_size % self.micro_batch_size:
            out.append(f"{prefix}global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        out += at_least(prefix, "max_steps", self.max_steps, 0)
        if not self.online and self.input.max_rows is not None:  # online reads input (checked above); offline ignores it
            out += at_least(prefix + "input.", "max_rows", self.input.max_rows, 1)
        out += self.target.problems(prefix + "target.")
        for name in ("optim", "deepspeed", "checkpoint", "logging", "wandb", "eval"):
            out += getattr(self, name).problems(f"{prefix}{name}.")
        return out


def drafter_config(d: dict) -> Any:
    """{"name": ..., fields...} -> the drafter's config dataclass; unknown fields name the key."""
    from deepspec.drafters import DRAFTERS

    name = d.get("name")
    if name not in DRAFTERS:
        raise ValueError(f"drafter.name={name!r} is not one of {sorted(DRAFTERS)}")
    cls = DRAFTERS[name].config_class
    fields = {k: v for k, v in d.items() if k != "name"}
    unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"drafter.{unknown[0]} is not a field of {cls.__name__} (fields: {sorted(cls.__dataclass_fields__)})")
    return cls(**fields)


def draft_vocab_problems(drafter: dict, prefix: str = "", vocab_size: int | None = None) -> list[str]:
    """``drafter.draft_vocab_size``: None (the full vocabulary) or 1 <= N <= the target's vocabulary (checked again
    once the target's config is read, ``check_draft_vocab``)."""
    n = drafter.get("draft_vocab_size")
    if n is None:
        return []
    if isinstance(n, bool) or not isinstance(n, int):
        return [f"{prefix}drafter.draft_vocab_size={n!r} must be an integer or null (null = the target's whole vocabulary)"]
    if n < 1 or (vocab_size is not None and n > vocab_size):
        upper = f"the target's vocab_size {vocab_size}" if vocab_size is not None else "the target's vocab_size"
        return [f"{prefix}drafter.draft_vocab_size={n} must be in [1, {upper}] (or null for the whole vocabulary)"]
    return []


def check_draft_vocab(drafter: dict, vocab_size: int) -> None:
    """Start-up check against the target's vocabulary size, raising one ConfigError that names the key."""
    problems = draft_vocab_problems(drafter, "", vocab_size)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
