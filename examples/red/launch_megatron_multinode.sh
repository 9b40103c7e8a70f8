#!/usr/bin/env bash
# RED with the Megatron backend on several nodes. Two ways to start it:
#   SLURM:  sbatch -N 4 --gpus-per-node=8 --ntasks-per-node=1 examples/red/launch_megatron_multinode.sh
#           (one task per node; each runs torchrun for its node's GPUs; rendezvous on the first node)
#   manual: on every node, NNODES=4 NODE_RANK=<i> MASTER_ADDR=<node 0 host> examples/red/launch_megatron_multinode.sh
# Knobs (environment): CONFIG (a recipe; its layout is the default), GPUS_PER_NODE, MASTER_PORT, and, to override
# the recipe: TP, PP, MICRO_BATCH, MAX_TOKENS (per packed micro-batch), PROMPTS_PER_STEP, MODEL_PATH, OUT_DIR.
# Extra arguments are passed on as dotted overrides. DP = NNODES * GPUS_PER_NODE / (TP * PP).
# Check that the layout fits first: megatron-red plan --world-size $((NNODES * GPUS_PER_NODE)) $CONFIG
set -euo pipefail

CONFIG=${CONFIG:-examples/red/qwen25_32b_16gpu.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
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

overrides=(model.backend=megatron)
[[ -n "${TP:-}" ]] && overrides+=(model.tensor_model_parallel_size="$TP")
[[ -n "${PP:-}" ]] && overrides+=(model.pipeline_model_parallel_size="$PP")
[[ -n "${MICRO_BATCH:-}" ]] && overrides+=(trainer.micro_batch_size="$MICRO_BATCH")
[[ -n "${MAX_TOKENS:-}" ]] && overrides+=(trainer.max_tokens_per_micro_batch="$MAX_TOKENS")
[[ -n "${PROMPTS_PER_STEP:-}" ]] && overrides+=(trainer.prompts_per_step="$PROMPTS_PER_STEP")
[[ -n "${MODEL_PATH:-}" ]] && overrides+=(model.path="$MODEL_PATH")
[[ -n "${OUT_DIR:-}" ]] && overrides+=(trainer.out_dir="$OUT_DIR")

export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m megatron_red.cli train --config "$CONFIG" "${overrides[@]}" "$@"
