#!/usr/bin/env bash
# RED with the Megatron backend on one node (default 8 GPUs): torchrun, TP x PP x DP = GPUS.
# Usage: examples/red/launch_megatron_1node.sh [extra dotted overrides...]
# Knobs (environment): CONFIG, GPUS, TP, PP, MICRO_BATCH, PROMPTS_PER_STEP, MODEL_PATH, OUT_DIR.
set -euo pipefail

CONFIG=${CONFIG:-examples/red/qwen25_math_1p5b_1gpu.yaml}
GPUS=${GPUS:-8}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-2}
PROMPTS_PER_STEP=${PROMPTS_PER_STEP:-64}
MODEL_PATH=${MODEL_PATH:-/models/Qwen2.5-Math-1.5B}
OUT_DIR=${OUT_DIR:-runs/red_megatron_tp${TP}_pp${PP}}

if (( GPUS % (TP * PP) != 0 )); then
  echo "GPUS=$GPUS must be a multiple of TP*PP=$((TP * PP))" >&2
  exit 1
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core: ordered TP communication / compute overlap
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec torchrun --standalone --nproc_per_node="$GPUS" -m megatron_red.cli train --config "$CONFIG" \
  model.backend=megatron \
  model.path="$MODEL_PATH" \
  model.tensor_model_parallel_size="$TP" \
  model.pipeline_model_parallel_size="$PP" \
  trainer.micro_batch_size="$MICRO_BATCH" \
  trainer.prompts_per_step="$PROMPTS_PER_STEP" \
  trainer.out_dir="$OUT_DIR" \
  "$@"
