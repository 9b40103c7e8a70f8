#!/usr/bin/env bash
# RED with the Megatron backend on one node (default 8 GPUs): torchrun, TP x PP x DP = GPUS.
# Usage: examples/red/launch_megatron_1node.sh [extra dotted overrides...]
# Knobs (environment): CONFIG (a recipe; its layout is the default), GPUS, and, to override the recipe: TP, PP,
# MICRO_BATCH, MAX_TOKENS (per packed micro-batch), PROMPTS_PER_STEP, MODEL_PATH, OUT_DIR.
# Check that the layout fits first: megatron-red plan --world-size $GPUS $CONFIG model.path=$MODEL_PATH
set -euo pipefail

CONFIG=${CONFIG:-examples/red/qwen25_math_1p5b_8gpu.yaml}
GPUS=${GPUS:-8}

overrides=(model.backend=megatron)
[[ -n "${TP:-}" ]] && overrides+=(model.tensor_model_parallel_size="$TP")
[[ -n "${PP:-}" ]] && overrides+=(model.pipeline_model_parallel_size="$PP")
[[ -n "${MICRO_BATCH:-}" ]] && overrides+=(trainer.micro_batch_size="$MICRO_BATCH")
[[ -n "${MAX_TOKENS:-}" ]] && overrides+=(trainer.max_tokens_per_micro_batch="$MAX_TOKENS")
[[ -n "${PROMPTS_PER_STEP:-}" ]] && overrides+=(trainer.prompts_per_step="$PROMPTS_PER_STEP")
[[ -n "${MODEL_PATH:-}" ]] && overrides+=(model.path="$MODEL_PATH")
[[ -n "${OUT_DIR:-}" ]] && overrides+=(trainer.out_dir="$OUT_DIR")

export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core: ordered TP communication / compute overlap
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec torchrun --standalone --nproc_per_node="$GPUS" -m megatron_red.cli train --config "$CONFIG" \
  "${overrides[@]}" "$@"
