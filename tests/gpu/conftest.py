"""tests/gpu: the CUDA path at real shapes, run by ``scripts/gpu_check.sh`` (``TRITON_INTERPRET=0 pytest tests/gpu``).

Skipped without CUDA, and in a process where the Triton interpreter is on: tests/conftest.py turns it on for the CPU
suite, and Triton reads it once, when a kernel is decorated, so a process runs the kernels either interpreted or
compiled, never both. These tests must run them compiled.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (scripts/gpu_check.sh runs these on a GPU)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "the Triton interpreter is on in this process: run `TRITON_INTERPRET=0 pytest tests/gpu` (scripts/gpu_check.sh does)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    if reason is None:
        return
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))
