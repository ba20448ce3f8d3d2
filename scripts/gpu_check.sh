#!/usr/bin/env bash
# One command for a lent GPU: CUDA tests, decoding physics, training speed and memory at a real shape (< 8 min).
#   scripts/gpu_check.sh              on a GPU: eval/results/benchmarks/gpu_<device>_<date>.json and .md
#   scripts/gpu_check.sh --dry-run    the same code at tiny shapes on the CPU (tests/test_gpu_check.py runs it)
# Other arguments go to scripts/gpu_check.py (--sections, --out-dir, --budget-s). No set-up step runs here: a GPU
# machine may have no network, so this uses $PYTHON, else .venv/bin/python, else python3, with the repository on
# PYTHONPATH (the package need not be installed; torch, transformers, deepspeed and triton must be).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_INTERPRET=0   # kernels compiled for the GPU, never interpreted (tests/conftest.py only sets a default)
for arg in "$@"; do  # the dry run is the CPU path everywhere: on a GPU machine too (DeepSpeed, NCCL, tests/gpu all see no GPU)
  if [[ "$arg" == "--dry-run" ]]; then export CUDA_VISIBLE_DEVICES=""; fi
done
exec "$PYTHON" scripts/gpu_check.py "$@"
