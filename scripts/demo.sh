#!/usr/bin/env bash
# Command 1: set up .venv and run the whole pipeline on the embedded toy target (CPU is enough).
#   scripts/demo.sh                 outputs under runs/demo
#   RUN_DIR=/tmp/x ROWS=128 scripts/demo.sh
# Stages that later issues add (train, eval) join this script as they land.
source "$(dirname "$0")/setup_env.sh"
RUN_DIR=${RUN_DIR:-runs/demo}
ROWS=${ROWS:-384}

# 1. Data stage: the toy target answers its own training prompts (regeneration), then its
#    layer features are cached to Parquet shards with a manifest; resumable if interrupted.
python data/cache.py build target=toy \
  input.paths=[deepspec/assets/toy_prompts/train.jsonl] input.max_rows="$ROWS" \
  regenerate.enabled=true regenerate.max_new_tokens=160 regenerate.batch_size=32 \
  out_dir="$RUN_DIR/cache"

# 2. Check every shard's checksum and decode every record; then summarise the cache.
python data/cache.py verify target=toy out_dir="$RUN_DIR/cache"
python data/cache.py stats target=toy out_dir="$RUN_DIR/cache" > "$RUN_DIR/cache_stats.json"

echo
echo "cache manifest: $RUN_DIR/cache/manifest.json"
echo "cache report:   $RUN_DIR/cache_stats.json"
