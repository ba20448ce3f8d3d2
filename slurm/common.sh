# Sourced by the sbatch templates (from the repository root): environment, node layout, logging.
#
#   DEEPSPEC_ENV            a file to source first (e.g. path/to/.venv/bin/activate); by default
#                           the job runs with the environment sbatch exported (activate, then submit)
#   DEEPSPEC_GPUS_PER_NODE  ranks per node for torchrun (default: $SLURM_GPUS_ON_NODE, else 1)
#   DEEPSPEC_RDZV_PORT      c10d rendezvous port on the first node (default 29500 + job id % 2000)
if [[ -n ${DEEPSPEC_ENV:-} ]]; then
  # shellcheck disable=SC1090
  source "$DEEPSPEC_ENV"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}
export PYTHONUNBUFFERED=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu   # DeepSpeed on CPU nodes (gloo)
fi
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NPROC_PER_NODE=${DEEPSPEC_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RDZV_PORT=${DEEPSPEC_RDZV_PORT:-$(( 29500 + SLURM_JOB_ID % 2000 ))}
export HEAD_NODE NPROC_PER_NODE RDZV_PORT
echo "[deepspec] job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
     "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}: $(date -Is); python $(command -v python)"
