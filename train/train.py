"""Train stage entry point: fit a drafter against a target cache (or the live target).

    python train/train.py cache_dir=runs/cache drafter=dspark run_dir=runs/train
    torchrun --nproc_per_node 8 train/train.py target=qwen3_8b drafter=dspark cache_dir=/data/cache
"""
from deepspec.training.cli import main

if __name__ == "__main__":
    main()
