"""Shared fixtures: tiny real Qwen3 targets (random weights, the toy tokenizer) and prompt files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deepspec.tiny_target import TOKENIZER_FILES, make_tiny_target, write_toy_prompts  # noqa: F401 (tests import these from here)

REPO = Path(__file__).resolve().parents[1]
TOY_DIR = REPO / "deepspec" / "assets" / "toy_target"
TOY_PROMPTS = REPO / "deepspec" / "assets" / "toy_prompts"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# precision=auto picks fp32 in tests on every machine (bf16 where a CPU has AMX would change results).
os.environ.setdefault("DEEPSPEC_AUTO_PRECISION", "fp32")
# Triton kernels run in the interpreter on CPU tensors; read when a kernel is decorated, so it is
# set here, before any test module imports deepspec.decoding.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    """A 4-layer, hidden-64 Qwen3 folder (random weights, toy tokenizer)."""
    return make_tiny_target(tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def other_tiny_target(tmp_path_factory) -> Path:
    """Same shape as ``tiny_target`` but other weights: a cache of one must not feed the other."""
    return make_tiny_target(tmp_path_factory.mktemp("other_tiny_target"), seed=1)


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    """40 conversation rows from the toy training prompt set."""
    return write_toy_prompts(tmp_path_factory.mktemp("inputs") / "chat.jsonl", 40)


def slurm_cluster_up() -> bool:
    """A Slurm controller answers (CI starts one on localhost: scripts/start_local_slurm.sh)."""
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def data_config(target_dir: Path, inputs: list[Path], out_dir: Path, **overrides):
    """A validated DataStageConfig for tests (small shards, small batches, no progress bar)."""
    from deepspec.config import DataStageConfig, check
    from deepspec.config.data import CacheConfig, InputConfig, TargetConfig

    cache = CacheConfig(**{"samples_per_shard": 8, "rows_per_row_group": 4, **overrides.pop("cache", {})})
    stage = {"max_length": 256, "min_loss_tokens": 4, "batch_size": 4, "progress": False, **overrides}
    cfg = DataStageConfig(out_dir=str(out_dir),
                          target=TargetConfig(**{"name_or_path": str(target_dir), "layer_ids": [-1, 1, 3], **stage.pop("target", {})}),
                          input=InputConfig(**{"paths": [str(p) for p in inputs], **stage.pop("input", {})}),
                          cache=cache, **stage)
    check(cfg)
    return cfg


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_two_nodes(cmd: list[str], env: dict, log_dir: Path, tag: str = "node") -> list:
    """Two torchrun launchers on this machine, one process each, meeting through a c10d rendezvous on localhost: what
    ``torchrun --nnodes 2`` on two hosts does (each launcher is a node; the rendezvous assigns the ranks). Logs go to
    ``log_dir/{tag}{0,1}.log``. -> the two launchers' Popen objects."""
    import sys

    port, run_id = free_port(), f"test{os.getpid()}"
    nodes = []
    for node in range(2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", run_id, "--max_restarts", "0"]
        log = open(log_dir / f"{tag}{node}.log", "w")
        nodes.append(subprocess.Popen(launcher + cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return nodes


def kill_node(launcher) -> None:
    """SIGKILL a node as a dead host leaves it: its launcher and every process under it at once (torchrun starts each
    worker in a session of its own, so killing the launcher's process group would leave the worker running)."""
    import psutil

    procs = [psutil.Process(launcher.pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        proc.kill()
    launcher.wait()
