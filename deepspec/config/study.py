"""Typed config of the reproduction study (``scripts/reproduce.py``, ``configs/reproduce/*.yaml``).

One cache, every drafter trained on it at the same budget, every run evaluated with the real
speculative loop. The YAML's ``quick`` block is merged on top by ``--quick`` (the same study, smaller).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deepspec.config.base import at_least

BLOCK_DRAFTERS = ("dspark", "dflash")


@dataclass
class StudyDrafter:
    """A drafter of the study: a preset of ``configs/drafter/`` plus field overrides (sized so that every
    drafter of a comparison has the same number of trainable parameters, within ``param_tolerance``)."""

    preset: str = "dspark"
    """configs/drafter/<preset>.yaml (it sets the drafter's loss weights too)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """drafter.<key>=<value> overrides (e.g. markov_rank, num_hidden_layers, intermediate_size)."""
    micro_batch_size: int = 0
    """Samples per forward (0 = the whole global batch in one). The same optimizer steps either way; 1 suits
    Eagle3, which runs every position, so padding a batch to its longest sample costs more than it saves."""


@dataclass
class StudyExperiment:
    """A grid of runs: every drafter x block size x seed. Runs shared between experiments train once."""

    drafters: list[str] = field(default_factory=list)
    """Names from ``drafters``."""
    block_sizes: list[int] = field(default_factory=lambda: [7])
    """gamma: the block size of DSpark/DFlash, the TTT depth (= chain length) of Eagle3."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (initialisation, anchors, data order)."""
    param_ratio: float = 1.0
    """Trainable parameters of the first drafter / those of each other drafter, as the comparison is designed:
    1 = equal budget; the paper's comparison sets the ratio of the reference's own architectures (DSpark 5
    layers / Eagle3 1 layer at Qwen3-8B: 3.73). Checked within ``param_tolerance`` (tests/test_study.py)."""


@dataclass
class StudyEvalSet:
    """A held-out prompt set ({"turns": [...]} rows)."""

    name: str = "toy_heldout"
    path: str = "deepspec/assets/toy_prompts/heldout.jsonl"
    max_prompts: int = 16


@dataclass
class StudyConfig:
    target: str = "toy"
    """configs/target/<name>.yaml."""
    train_source: str = "deepspec/assets/toy_prompts/train.jsonl"
    """Training prompts; the target regenerates their answers before caching."""
    rows: int = 1200
    """Training prompts used (first N rows)."""
    regenerate_max_new_tokens: int = 160
    """Length of the target's regenerated answers."""
    cache: str = "parquet_fp16"
    """configs/cache/<name>.yaml."""
    steps: int = 600
    """Optimizer steps of every run (the equal budget)."""
    global_batch_size: int = 8
    """Samples per optimizer step."""
    lr: float = 1.0e-3
    """Peak learning rate (warmup + cosine, as the train stage)."""
    num_anchors: int = 32
    """Blocks sampled per sample (DSpark/DFlash)."""
    val_fraction: float = 0.05
    """Cache samples held out for validation (loss curve, convergence, best checkpoint)."""
    val_every_steps: int = 50
    """Validation interval."""
    checkpoint_every_steps: int = 500
    """Checkpoint interval of each training run: a killed study resumes a run from its last checkpoint (the trainer's
    resume is exact: tests/test_resume*). Not a setting of the result: records made at another cadence are kept."""
    val_max_samples: int = 64
    """Validation samples per evaluation."""
    convergence_window: float = 0.25
    """Converged when the best validation loss of the last ``window`` of training improves on the best before it..."""
    convergence_tolerance: float = 0.01
    """... by less than this fraction."""
    param_tolerance: float = 0.10
    """Trainable parameters of the drafters of one experiment may differ from its ``param_ratio`` by at most
    this fraction."""
    train_overrides: list[str] = field(default_factory=list)
    """Extra train-stage overrides for every run (e.g. deepspeed.precision=fp32)."""
    drafters: dict[str, StudyDrafter] = field(default_factory=dict)
    """Name -> preset and fields."""
    experiments: dict[str, StudyExperiment] = field(default_factory=dict)
    """headline + eagle3 (claim 1 at equal parameters), paper_ratio (claim 1 at the reference's parameter ratio),
    block_size (claim 2), heads (claim 5); claims 3-4 read the headline runs."""
    eval_sets: list[StudyEvalSet] = field(default_factory=list)
    """Held-out prompt sets (the training source's held-out split and public benchmarks)."""
    max_new_tokens: int = 96
    """Tokens generated per turn."""
    eval_seed: int = 0
    """Sampling seed of the evaluation."""
    calibration_fraction: float = 0.5
    """Prompts of each set (by index) that fit Sequential Temperature Scaling; the rest report it."""
    quick: dict[str, Any] = field(default_factory=dict)
    """Overrides applied by ``--quick``."""

    def problems(self, prefix: str = "") -> list[str]:
        out = []
        for key in ("rows", "regenerate_max_new_tokens", "steps", "global_batch_size", "num_anchors", "val_every_steps",
                    "checkpoint_every_steps", "val_max_samples", "max_new_tokens"):
            out += at_least(prefix, key, getattr(self, key), 1)
        if not 0 < self.val_fraction < 0.5:
            out.append(f"{prefix}val_fraction={self.val_fraction} must be in (0, 0.5): convergence is judged on it")
        if not 0 < self.convergence_window < 1:
            out.append(f"{prefix}convergence_window={self.convergence_window} must be in (0, 1)")
        if not self.eval_sets:
            out.append(f"{prefix}eval_sets is empty")
        if not self.experiments:
            out.append(f"{prefix}experiments is empty")
        for name, exp in self.experiments.items():
            for d in exp.drafters:
                if d not in self.drafters:
                    out.append(f"{prefix}experiments.{name}.drafters: {d!r} is not in drafters ({sorted(self.drafters)})")
            out += [f"{prefix}experiments.{name}.block_sizes: {g} < 1" for g in exp.block_sizes if g < 1]
            if not exp.drafters or not exp.seeds:
                out.append(f"{prefix}experiments.{name} needs drafters and seeds")
            if not exp.param_ratio > 0:
                out.append(f"{prefix}experiments.{name}.param_ratio={exp.param_ratio} must be > 0")
        for name, d in self.drafters.items():
            if d.preset.split("_")[0] not in (*BLOCK_DRAFTERS, "eagle3"):
                out.append(f"{prefix}drafters.{name}.preset={d.preset!r} is not a dspark/dflash/eagle3 preset")
        if len({s.name for s in self.eval_sets}) != len(self.eval_sets):
            out.append(f"{prefix}eval_sets: names repeat")
        if self.val_every_steps > self.steps:
            out.append(f"{prefix}val_every_steps={self.val_every_steps} > steps={self.steps}: no validation curve")
        return out
