"""A first run on a fresh machine does no work it does not need: single-process training builds no DeepSpeed op
(its CPU backend would JIT-compile a shared-memory all-reduce for a process that talks to nobody)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE_PROCESS_ENGINE = """
import torch
from deepspec import distributed
from deepspec.config.train import TrainStageConfig
from deepspec.training.engine import build_engine

distributed.init_process_group(single_process=True)
engine, _ = build_engine(torch.nn.Linear(4, 4), TrainStageConfig(global_batch_size=1, micro_batch_size=1), 10, 1)
loss = engine(torch.ones(1, 4)).sum()
engine.backward(loss)
engine.step()
print("stepped")
"""


def test_single_process_cpu_training_builds_no_deepspeed_op(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS_ENGINE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stepped" in proc.stdout
    built = list((tmp_path / "torch_extensions").glob("*")) if (tmp_path / "torch_extensions").exists() else []
    assert built == [] and "built successfully" not in proc.stdout + proc.stderr
