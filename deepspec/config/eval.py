"""Typed config of the eval stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from deepspec.config.base import WandbConfig, at_least
from deepspec.config.data import TargetConfig
from deepspec.config.decoding import ScheduleConfig


@dataclass
class EvalDatasetConfig:
    """One prompt set in the ``{"turns": [...]}`` layout."""

    name: str = "heldout"
    """Name in the report."""
    path: str = "deepspec/assets/toy_prompts/heldout.jsonl"
    """JSONL file of rows {"turns": [...]} (later turns follow the model's own answers)."""
    max_prompts: int = 16
    """First N rows (after a seeded shuffle when shuffle=true)."""
    shuffle: bool = False
    """Shuffle rows with ``seed`` before taking max_prompts."""


@dataclass
class EvalStageConfig:
    """Speculative decoding against plain decoding of the same target, on the same prompts."""

    run_dir: str = "runs/eval"
    """results.json, summary.md, calibration files."""
    drafter_path: Optional[str] = None
    """Exported drafter folder (ours or the reference layout)."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The target (must match the drafter's)."""
    datasets: list[EvalDatasetConfig] = field(default_factory=lambda: [EvalDatasetConfig()])
    """Prompt sets."""
    max_new_tokens: int = 128
    """Tokens generated per turn."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_k: int = 0
    """Top-k for target and draft alike (0 = off)."""
    top_p: float = 1.0
    """Top-p for target and draft alike."""
    seed: int = 0
    """Sampling and shuffling seed."""
    also_greedy: bool = True
    """Also report greedy acceptance beside the sampled figures."""
    peers: bool = True
    """Time transformers' generate and its prompt-lookup decoding on the same prompts."""
    serving_loads: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """Concurrent requests simulated for the scheduler comparison (DSpark)."""
    sps_max_tokens: int = 64
    """Largest verify batch (tokens) profiled for SPS(B); beyond it the cost is extrapolated linearly."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Verification length per round: fixed (every draft), or Algorithm 1 (``scheduled``, ``scheduled_with_draft_cost``)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B run of the eval: headline figures, the summary table and the plots."""
    calibration_fraction: float = 0.5
    """DSpark: fraction of rounds (by prompt) used to fit Sequential Temperature Scaling; the rest report it."""

    def problems(self, prefix: str = "") -> list[str]:
        out = []
        if not self.drafter_path:
            out.append(f"{prefix}drafter_path is required (an exported drafter folder)")
        out += at_least(prefix, "max_new_tokens", self.max_new_tokens, 1) + at_least(prefix, "temperature", self.temperature, 0.0)
        out += at_least(prefix, "top_k", self.top_k, 0) + at_least(prefix, "sps_max_tokens", self.sps_max_tokens, 1)
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"{prefix}top_p={self.top_p} must be in (0, 1]")
        out += [f"{prefix}serving_loads: {r} requests < 1" for r in self.serving_loads if r < 1]
        for i, ds in enumerate(self.datasets):
            out += at_least(f"{prefix}datasets[{i}].", "max_prompts", ds.max_prompts, 1)
        if not self.datasets:
            out.append(f"{prefix}datasets is empty")
        if not 0.0 <= self.calibration_fraction < 1.0:
            out.append(f"{prefix}calibration_fraction={self.calibration_fraction} must be in [0, 1)")
        return (out + self.target.problems(prefix + "target.") + self.schedule.problems(prefix + "schedule.")
                + self.wandb.problems(prefix + "wandb."))
