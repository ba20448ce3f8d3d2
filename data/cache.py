"""Data stage entry point: build / verify / inspect a target cache.

    python data/cache.py build target=toy input.paths=[prompts.jsonl] out_dir=runs/cache
    torchrun --nproc_per_node 2 data/cache.py build ...
    python data/cache.py verify out_dir=runs/cache
"""
from deepspec.data.cli import main

if __name__ == "__main__":
    main()
