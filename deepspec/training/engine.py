"""DeepSpeed wiring, in one place: the DeepSpeed config, AdamW over the trainable parameters, the
warmup + cosine schedule, and ``deepspeed.initialize``. Model code never sees DeepSpeed.

The optimizer is a torch AdamW handed to DeepSpeed (fused on CUDA), so the same code trains on the
CPU (gloo, no DeepSpeed CUDA ops to build) and on GPUs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from deepspec.config.train import TrainStageConfig
from deepspec.precision import resolve_precision


def gradient_accumulation(cfg: TrainStageConfig, world: int) -> int:
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size x ranks = {per_step}")
    return cfg.global_batch_size // per_step


def deepspeed_config(cfg: TrainStageConfig, world: int, device: torch.device | None = None, load_universal: bool = False) -> dict:
    """DeepSpeed's config; ``deepspeed.precision=auto`` is resolved for ``device`` (bf16 only where native);
    ``load_universal``: the checkpoint to resume is a universal copy (elastic resume)."""
    precision = resolve_precision(cfg.deepspeed.precision, device or torch.device("cpu"), "training")
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation(cfg, world),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,  # our logger prints
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    for key, value in cfg.deepspeed.extra.items():
        ds[key] = {**ds[key], **value} if isinstance(ds.get(key), dict) and isinstance(value, dict) else value
    return ds


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def clear_stale_build_locks(max_age_s: float = 900.0) -> list[str]:
    """Remove torch C++-extension build locks older than ``max_age_s``; -> the paths removed.

    DeepSpeed builds its ops (on the CPU: ``deepspeed_shm_comm``) with torch's cpp_extension, which takes a
    ``lock`` file and waits on it without a timeout. A process killed mid-build (a preemption, a SIGKILL) leaves
    the lock, and every later start then hangs silently (seen: a training run stuck 11 minutes at start-up). A
    build takes about a minute here; a lock this old has no owner."""
    import logging
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    removed = []
    for lock in Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()).glob("*/*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
        except OSError:
            continue
    if removed:
        logging.getLogger(__name__).warning("removed stale extension build locks (a killed build left them; DeepSpeed "
                                            "would wait on them forever): %s", ", ".join(removed))
    return removed


def skip_or_announce_comm_op_build(world: int, device: torch.device) -> None:
    """DeepSpeed's torch backend JIT-builds its shared-memory all-reduce (``deepspeed_shm_comm``) on the CPU whenever it
    starts: 66-96 s of C++ compilation on a fresh 2-core machine, before the first step, with no word of it. A single
    process communicates with nobody, so it is not built there (DeepSpeed reads its table of compatible ops before
    building; an op marked incompatible falls back to gloo, which one rank never calls). CPU ranks of a multi-process
    run do use it: the build is announced, once per machine (then it is cached in torch's extension folder)."""
    import logging

    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    from torch.utils.cpp_extension import get_default_build_root

    name = ShareMemCommBuilder.NAME
    if world == 1:
        deepspeed.ops.__compatible_ops__[name] = False
    elif device.type == "cpu" and deepspeed.ops.__compatible_ops__.get(name):
        built = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name / f"{name}.so"
        if not built.exists():
            logging.getLogger(__name__).info("building DeepSpeed's shared-memory communication op for CPU ranks (%s): once "
                                             "per machine, about 1-2 minutes on 2 cores, kept in %s", name, built.parent)


def build_engine(model: torch.nn.Module, cfg: TrainStageConfig, total_steps: int, world: int, load_universal: bool = False):
    """-> (DeepSpeed engine, lr scheduler). The scheduler steps with every optimizer step."""
    import deepspeed

    clear_stale_build_locks()
    params = [p for p in model.parameters() if p.requires_grad]
    skip_or_announce_comm_op_build(world, params[0].device)
    fused = torch.cuda.is_available()
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio))
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(cfg, world, params[0].device, load_universal))
    return engine, sched
