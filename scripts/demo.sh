#!/usr/bin/env bash
# Command 1: set up .venv and run the whole pipeline on the embedded toy target (CPU is enough).
#   scripts/demo.sh                        outputs under runs/demo
#   RUN_DIR=/tmp/x ROWS=512 STEPS=600 scripts/demo.sh     a longer run: a better drafter
# Sized to finish in about 15 minutes on 2 CPU cores from a fresh clone and an empty home directory (set-up
# included), about 10 once set up. Every stage runs for real, at toy scale: a 6-layer target with hidden size 256
# and a 2-layer drafter. It prints each stage's time, and all of them at the end.
set -euo pipefail
START=$SECONDS
RUN_DIR=${RUN_DIR:-runs/demo}
ROWS=${ROWS:-256}      # training prompts answered by the toy target and cached
STEPS=${STEPS:-240}    # DSpark optimizer steps (8 samples each)
PROMPTS=${PROMPTS:-8}  # eval prompts per dataset

TIMES=()  # "name seconds" per finished stage
LAST_NAME="" LAST_START=$START
mmss() { echo "$(( $1 / 60 ))m$(( $1 % 60 ))s"; }
stage() {  # stage N NAME TITLE: closes the previous stage's time, then a numbered header with the time so far
  [ -z "$LAST_NAME" ] || TIMES+=("$LAST_NAME $(( SECONDS - LAST_START ))")
  LAST_NAME=$2 LAST_START=$SECONDS
  [ -n "$3" ] || return 0
  echo
  echo "=== [$1/5] $3  (demo time so far: $(mmss $(( SECONDS - START ))))"
}
cat <<EOF
deepspec demo on the embedded toy target, outputs under $RUN_DIR:
  0/5 set-up  .venv with torch 2.13.0 and deepspec's dependencies (pip: a few minutes on a fresh machine, mostly
              downloads; seconds once installed)
  1/5 data    the toy target answers $ROWS training prompts (regeneration), then its layer features are
              cached to Parquet shards with a manifest (resumable: rerun to continue)
  2/5 verify  every shard's checksum and every record decoded; cache statistics
  3/5 train   a DSpark drafter, $STEPS steps with DeepSpeed (one CPU process: no DeepSpeed op is compiled),
              exported to safetensors
  4/5 eval    speculative vs plain decoding of the toy target on $PROMPTS prompts of two datasets; the target's
              verify cost on this machine is measured for the widths the report needs (seconds, the first time
              only: kept in ~/.cache/deepspec)
  5/5 summary what the drafter bought, in plain words
EOF

stage 0 set-up "set-up: .venv and dependencies"
source "$(dirname "$0")/setup_env.sh"
mkdir -p "$RUN_DIR"
export WANDB_MODE=${WANDB_MODE:-disabled}

stage 1 data "data: regenerate answers with the target, cache its features"
python data/cache.py build target=toy \
  input.paths=[deepspec/assets/toy_prompts/train.jsonl] input.max_rows="$ROWS" \
  regenerate.enabled=true regenerate.max_new_tokens=160 regenerate.batch_size=32 \
  out_dir="$RUN_DIR/cache"

stage 2 verify "verify the cache"
python data/cache.py verify target=toy out_dir="$RUN_DIR/cache"
python data/cache.py stats target=toy out_dir="$RUN_DIR/cache" > "$RUN_DIR/cache_stats.json"

stage 3 train "train DSpark ($STEPS steps; precision auto: bf16 only where the CPU/GPU runs it natively)"
python train/train.py target=toy drafter=dspark cache_dir="$RUN_DIR/cache" run_dir="$RUN_DIR/train" \
  max_steps="$STEPS" global_batch_size=8 optim.lr=1e-3 drafter.num_anchors=64 \
  eval.val_fraction=0.05 eval.every_steps=80 checkpoint.every_steps=80 logging.every_steps=10

stage 4 eval "eval: speculative vs plain decoding (T=1, greedy beside it)"
python eval/eval.py target=toy drafter_path="$RUN_DIR/train/best" run_dir="$RUN_DIR/eval" \
  'datasets=[{name:toy_heldout,path:deepspec/assets/toy_prompts/heldout.jsonl,max_prompts:'"$PROMPTS"'},{name:humaneval,path:deepspec/assets/eval_prompts/humaneval.jsonl,max_prompts:'"$PROMPTS"'}]' \
  max_new_tokens=96

stage 5 summary "summary"
python - "$RUN_DIR" <<'EOF'
import json, sys, textwrap
from pathlib import Path
run = Path(sys.argv[1])
summary = (run / "eval" / "summary.md").read_text().split("\n\n")[1]  # the plain-words paragraph
print(textwrap.fill(summary.replace("**", ""), 100))
results = json.loads((run / "eval" / "results.json").read_text())
for name, entry in results["datasets"].items():
    s, g = entry["sampled"], entry.get("greedy", {})
    line = f"  {name}: tau {s['tau']:.2f}, speedup {s['speedup']:.2f}x (T=1)"
    if g:
        line += f"; greedy tau {g['tau']:.2f}, identical to plain greedy: {'yes' if g['greedy_identical_to_plain'] else 'NO'}"
    print(line)
EOF
echo
echo "cache manifest: $RUN_DIR/cache/manifest.json"
echo "cache report:   $RUN_DIR/cache_stats.json"
echo "training:       $RUN_DIR/train (metrics.jsonl, best/, export/)"
echo "eval report:    $RUN_DIR/eval/summary.md"
stage 6 end ""  # closes the last stage's time
echo "stage times: $(for t in "${TIMES[@]}"; do set -- $t; printf '%s %s  ' "$1" "$(mmss "$2")"; done)"
echo "demo finished in $(mmss $(( SECONDS - START ))) (set-up included)"
