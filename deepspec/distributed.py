"""Process-group setup shared by the stages: who am I, how many are we, wait for everyone.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain ``python`` run is rank 0 of 1. The process
group uses NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    _export_submitit_environment()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _export_submitit_environment() -> None:
    """Under the Hydra submitit launcher with several tasks (``hydra.launcher.tasks_per_node``), each
    Slurm task is one rank: set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the Slurm job, as torchrun would."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS", 1)) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def init_process_group(timeout_minutes: float = 24 * 60, single_process: bool = False) -> None:
    """Join the torchrun job's process group.

    A plain single process gets none unless ``single_process`` (DeepSpeed wants a process group
    and would otherwise look for MPI): then a 1-rank group on a free local port.
    """
    _, world = rank_and_world()
    if world == 1 and single_process and not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            os.environ.setdefault(key, value)
        world = 2  # fall through to the common path
    if torch.cuda.is_available():  # before anything allocates: otherwise every rank starts on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def barrier() -> None:
    if dist.is_initialized():
        # gloo barrier: fine on CPU and GPU jobs, and it needs no device
        dist.barrier(group=cpu_group())


_CPU_GROUP = None


def cpu_group():
    """A gloo group over all ranks, for collectives on CPU tensors (NCCL rejects them)."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CPU_GROUP


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
