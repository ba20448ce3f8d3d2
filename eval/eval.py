"""Eval stage entry point: speculative vs plain decoding of the same target on the same prompts.

    python eval/eval.py drafter_path=runs/demo/train/best temperature=1.0 run_dir=runs/eval
"""
from deepspec.evaluation.cli import main

if __name__ == "__main__":
    main()
