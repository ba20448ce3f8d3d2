#!/usr/bin/env bash
# Command 1: set up .venv and run the whole pipeline on the embedded toy target (CPU is enough).
#   scripts/demo.sh                        outputs under runs/demo
#   RUN_DIR=/tmp/x ROWS=128 STEPS=100 scripts/demo.sh
source "$(dirname "$0")/setup_env.sh"
RUN_DIR=${RUN_DIR:-runs/demo}
ROWS=${ROWS:-512}      # training prompts answered by the toy target and cached
STEPS=${STEPS:-300}    # DSpark optimizer steps
PROMPTS=${PROMPTS:-8}  # eval prompts per dataset

# 1. Data: the toy target answers its own training prompts (regeneration), then its layer
#    features are cached to Parquet shards with a manifest (resumable: rerun to continue).
python data/cache.py build target=toy \
  input.paths=[deepspec/assets/toy_prompts/train.jsonl] input.max_rows="$ROWS" \
  regenerate.enabled=true regenerate.max_new_tokens=192 regenerate.batch_size=32 \
  out_dir="$RUN_DIR/cache"
# Check every shard's checksum and decode every record; summarise the cache.
python data/cache.py verify target=toy out_dir="$RUN_DIR/cache"
python data/cache.py stats target=toy out_dir="$RUN_DIR/cache" > "$RUN_DIR/cache_stats.json"

# 2. Train a DSpark drafter on the cache with DeepSpeed (one CPU process, bf16 autocast via DeepSpeed).
python train/train.py target=toy drafter=dspark cache_dir="$RUN_DIR/cache" run_dir="$RUN_DIR/train" \
  max_steps="$STEPS" global_batch_size=8 optim.lr=1e-3 drafter.num_anchors=64 \
  eval.val_fraction=0.05 eval.every_steps=100 checkpoint.every_steps=100 logging.every_steps=10

# 3. Evaluate it: speculative vs plain decoding of the toy target, T=1 (greedy beside it), on the
#    toy target's held-out prompts and HumanEval; report, plots, calibration, scheduler simulation.
python eval/eval.py target=toy drafter_path="$RUN_DIR/train/best" run_dir="$RUN_DIR/eval" \
  'datasets=[{name:toy_heldout,path:deepspec/assets/toy_prompts/heldout.jsonl,max_prompts:'"$PROMPTS"'},{name:humaneval,path:deepspec/assets/eval_prompts/humaneval.jsonl,max_prompts:'"$PROMPTS"'}]' \
  max_new_tokens=96

echo
echo "cache manifest: $RUN_DIR/cache/manifest.json"
echo "cache report:   $RUN_DIR/cache_stats.json"
echo "training:       $RUN_DIR/train (metrics.jsonl, best/, export/)"
echo "eval report:    $RUN_DIR/eval/summary.md"
