#!/usr/bin/env bash
# The whole pipeline as three Slurm jobs chained by dependencies: data (a job array) -> train
# (multi-node torchrun) -> eval. Each starts only if the one before succeeded (afterok); a requeued
# train job keeps eval waiting. All three W&B runs share one group (DEEPSPEC_RUN_GROUP).
#
#   slurm/pipeline.sh --run-dir /shared/runs/qwen3-8b --target qwen3_8b --data-parts 16 \
#       --train-nodes 4 --gpus-per-node 8 --sbatch "--partition=gpu --account=myteam" \
#       --data input.paths=[/shared/data/sharegpt.jsonl] regenerate.enabled=true \
#       --train drafter=dspark epochs=10 global_batch_size=512 \
#       --eval max_new_tokens=512
#
# Options (all optional; the defaults run the embedded toy target on CPU nodes):
#   --run-dir DIR        cache/, train/, eval/ go here (shared file system). Default runs/pipeline-<time>
#   --name NAME          W&B group and job-name prefix. Default: the run dir's name
#   --target PRESET      configs/target/<PRESET>.yaml for all three stages. Default toy
#   --data-parts N       data-stage array tasks (independent parts of one cache). Default 1
#   --train-nodes N      nodes for training (one torchrun per node). Default 1
#   --gpus-per-node G    GPUs per node for every stage, and training ranks per node. Default: none (CPU)
#   --ranks-per-node R   training ranks per node without GPUs (CPU nodes). Default 1
#   --sbatch "ARGS"      extra sbatch options for every job (partition, account, time, ...)
#   --data/--train/--eval OVERRIDES...   Hydra overrides for that stage, up to the next stage flag
# Prints the three job ids, one per line (data, train, eval), on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR="runs/pipeline-$(date +%Y%m%d-%H%M%S)"; NAME=""; TARGET=toy; PARTS=1; NODES=1; GPUS=""; RANKS=1
SBATCH_ARGS=""; DATA=(); TRAIN=(); EVAL=(); stage=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --run-dir) RUN_DIR=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --data-parts) PARTS=$2; shift 2 ;;
    --train-nodes) NODES=$2; shift 2 ;;
    --gpus-per-node) GPUS=$2; shift 2 ;;
    --ranks-per-node) RANKS=$2; shift 2 ;;
    --sbatch) SBATCH_ARGS=$2; shift 2 ;;
    --data|--train|--eval) stage=${1#--}; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) case $stage in
         data) DATA+=("$1") ;; train) TRAIN+=("$1") ;; eval) EVAL+=("$1") ;;
         *) echo "pipeline.sh: unexpected argument '$1' (stage overrides follow --data, --train or --eval)" >&2; exit 2 ;;
       esac; shift ;;
  esac
done
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
NAME=${NAME:-$(basename "$RUN_DIR")}
export DEEPSPEC_RUN_GROUP=$NAME
gpu_args=(); [[ -n $GPUS ]] && gpu_args=(--gpus-per-node="$GPUS")
export DEEPSPEC_GPUS_PER_NODE=${GPUS:-$RANKS}
# shellcheck disable=SC2206
extra=($SBATCH_ARGS)
common=(--parsable --output="$RUN_DIR/slurm-%x-%j.out" "${extra[@]}")

data=$(sbatch "${common[@]}" "${gpu_args[@]}" --job-name="$NAME-data" --array=0-$((PARTS - 1)) \
  slurm/data.sbatch target="$TARGET" out_dir="$RUN_DIR/cache" "${DATA[@]}")
train=$(sbatch "${common[@]}" "${gpu_args[@]}" --job-name="$NAME-train" --nodes="$NODES" \
  --dependency=afterok:"$data" --kill-on-invalid-dep=yes \
  slurm/train.sbatch target="$TARGET" cache_dir="$RUN_DIR/cache" run_dir="$RUN_DIR/train" "${TRAIN[@]}")
eval_gpu=(); [[ -n $GPUS ]] && eval_gpu=(--gpus-per-node=1)
eval=$(sbatch "${common[@]}" "${eval_gpu[@]}" --job-name="$NAME-eval" \
  --dependency=afterok:"$train" --kill-on-invalid-dep=yes \
  slurm/eval.sbatch target="$TARGET" drafter_path="$RUN_DIR/train/export" run_dir="$RUN_DIR/eval" "${EVAL[@]}")
printf '%s\n%s\n%s\n' "$data" "$train" "$eval"
echo "pipeline $NAME: data $data -> train $train -> eval $eval; logs in $RUN_DIR/slurm-*.out;" \
     "watch with: squeue -j $data,$train,$eval   (afterwards: sacct -j $data,$train,$eval)" >&2
