"""Training metrics to the console (a Progress bar, or log lines off a terminal), ``<run_dir>/metrics.jsonl`` and W&B, from rank 0.

The reference's training metrics are derived from the loss's sums: analytic acceptance per draft
position (1 - TV, conditional on the earlier positions), expected tau (1 + sum_k prod_{i<=k} a_i,
bonus included), and the confidence head's bias and absolute error.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from deepspec.config.base import WandbConfig
from deepspec.config.train import LoggingConfig
from deepspec.distributed import cpu_group
from deepspec.progress import Progress
from deepspec.tracking import start_wandb_run

SUM_KEYS = ("acc_sum", "acc_count", "tau_sum", "tau_count", "conf_bias_sum", "conf_abs_sum")


class MetricSums:
    """Accumulates a step's metric sums over micro-batches, then reduces them over ranks."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.means: dict[str, list[float]] = {}

    def add(self, out: dict) -> None:
        for k, v in out.items():
            if k in SUM_KEYS:
                self.sums[k] = self.sums.get(k, 0) + v.detach().float()
            elif k != "loss":
                self.means.setdefault(k, []).append(float(v))
        self.means.setdefault("loss", []).append(float(out["loss"].detach()))

    def reduce(self) -> dict:
        """-> flat dict of floats (averaged over micro-batches and ranks)."""
        out = {}
        keys = sorted(self.sums)
        if keys:
            flat = torch.cat([self.sums[k].reshape(-1).cpu() for k in keys])
            means = torch.tensor([sum(v) / len(v) for v in self.means.values()])
            if dist.is_initialized():  # CPU tensors: reduce on the gloo group (NCCL takes only CUDA tensors)
                dist.all_reduce(flat, group=cpu_group())
                dist.all_reduce(means, group=cpu_group())
                means /= dist.get_world_size()
            sizes = [self.sums[k].numel() for k in keys]
            parts = dict(zip(keys, flat.split(sizes)))
            acc = parts["acc_sum"] / parts["acc_count"].clamp_min(1)
            out.update({f"accept_rate@{i}": float(a) for i, a in enumerate(acc)})
            out["expected_tau"] = float(parts["tau_sum"] / parts["tau_count"].clamp_min(1))
            if "conf_bias_sum" in parts:
                n = parts["acc_count"].sum().clamp_min(1)
                out["confidence_bias"] = float(parts["conf_bias_sum"] / n)
                out["confidence_abs_error"] = float(parts["conf_abs_sum"] / n)
            out.update({k: float(m) for k, m in zip(self.means, means)})
        return out


class MetricsLogger:
    """Rank 0 writes each logged step to metrics.jsonl and, when enabled, to W&B (same values)."""

    def __init__(self, cfg: LoggingConfig, wandb_cfg: WandbConfig, run_dir: Path, rank: int, total_steps: int,
                 start_step: int, config: dict):
        self.cfg, self.rank = cfg, rank
        self.file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
        self.bar = Progress(total_steps, "step", "train", rank == 0 and cfg.progress, initial=start_step)
        self.wandb = start_wandb_run(wandb_cfg, "train", run_dir, config) if rank == 0 else None
        self.t0, self.tokens = time.time(), 0

    def step(self, step: int, tokens: int, metrics: dict | None) -> None:
        """Called every optimizer step; ``metrics`` only on logging steps."""
        self.tokens += tokens
        self.bar.update(1, tokens=tokens)
        if metrics is None or self.rank != 0:
            return
        metrics = {"step": step, "tokens_per_s": self.tokens / max(time.time() - self.t0, 1e-9), **metrics}
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        self.bar.set_postfix(" ".join(f"{k} {metrics[k]:.3g}" for k in ("loss", "ce", "l1", "bce", "lr", "expected_tau") if k in metrics))

    def eval(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        row = {"step": step, **{f"val/{k}": v for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.bar.write(f"step {step}: held-out expected tau {metrics.get('expected_tau', float('nan')):.3f}")

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
