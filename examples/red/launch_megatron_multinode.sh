#!/usr/bin/env bash
# RED with the Megatron backend on several nodes. Two ways to start it:
#   SLURM:  sbatch -N 4 --gpus-per-node=8 --ntasks-per-node=1 examples/red/launch_megatron_multinode.sh
#           (one task per node; each runs torchrun for its node's GPUs; rendezvous on the first node)
#   manual: on every node, NNODES=4 NODE_RANK=<i> MASTER_ADDR=<node 0 host> examples/red/launch_megatron_multinode.sh
# Knobs (environment): CONFIG, GPUS_PER_NODE, TP, PP, MICRO_BATCH, PROMPTS_PER_STEP, MODEL_PATH, OUT_DIR,
# MASTER_PORT. Extra arguments are passed on as dotted overrides. DP = NNODES * GPUS_PER_NODE / (TP * PP).
set -euo pipefail

CONFIG=${CONFIG:-examples/red/qwen25_math_1p5b_1gpu.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-4}
PP=${PP:-2}
MICRO_BATCH=${MICRO_BATCH:-2}
PROMPTS_PER_STEP=${PROMPTS_PER_STEP:-128}
MODEL_PATH=${MODEL_PATH:-/models/Qwen2.5-7B}
OUT_DIR=${OUT_DIR:-runs/red_megatron_multinode}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ -n "${SLURM_JOB_ID:-}" && -z "${INSIDE_SRUN:-}" ]]; then
  # Batch step: start one launcher per node; they find node 0 through MASTER_ADDR.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR MASTER_PORT INSIDE_SRUN=1
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$0" "$@"
fi

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}

WORLD=$((NNODES * GPUS_PER_NODE))
if (( WORLD % (TP * PP) != 0 )); then
  echo "NNODES*GPUS_PER_NODE=$WORLD must be a multiple of TP*PP=$((TP * PP))" >&2
  exit 1
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m megatron_red.cli train --config "$CONFIG" \
  model.backend=megatron \
  model.path="$MODEL_PATH" \
  model.tensor_model_parallel_size="$TP" \
  model.pipeline_model_parallel_size="$PP" \
  trainer.micro_batch_size="$MICRO_BATCH" \
  trainer.prompts_per_step="$PROMPTS_PER_STEP" \
  trainer.out_dir="$OUT_DIR" \
  "$@"
