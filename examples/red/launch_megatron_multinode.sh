#!/usr/bin/env bash
# RED with the Megatron backend on several nodes. Two ways to start it:
#   SLURM:  from the repository root, on a file system every node mounts (the run's data, model and run directory
#           must be there too):
#             sbatch -N 4 --gpus-per-node=8 --ntasks-per-node=1 --cpus-per-task=<cores per node> \
#               examples/red/launch_megatron_multinode.sh
#           The batch step starts one launcher per node with srun (cores per node passed on as --cpus-per-task, so
#           that clusters which confine tasks give the node's 8 workers all of them), each runs torchrun for its
#           node's GPUs, rendezvous on the first node. sbatch runs a private copy of this script on the first node
#           only, so srun runs it from the submit directory (or LAUNCH_SCRIPT), which every node reads.
#   manual: on every node, NNODES=4 NODE_RANK=<i> MASTER_ADDR=<node 0 host> examples/red/launch_megatron_multinode.sh
# Knobs (environment): CONFIG (a recipe; its layout is the default), GPUS_PER_NODE, MASTER_PORT, CPUS_PER_NODE
# (cores for a node's workers; default SLURM's cpus-per-task, else every core of the node), IFNAME (the network
# interface between nodes, e.g. ib0 or eth0: NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME, for clusters where the host
# name resolves to a loopback address such as 127.0.1.1), LAUNCH_SCRIPT (this script's path as every node reads it),
# and, to override the recipe: TP, PP, MICRO_BATCH, MAX_TOKENS (per packed micro-batch), PROMPTS_PER_STEP,
# MODEL_PATH, OUT_DIR. Extra arguments are passed on as dotted overrides. DP = NNODES * GPUS_PER_NODE / (TP * PP).
# Check that the layout fits first: megatron-red plan --world-size $((NNODES * GPUS_PER_NODE)) $CONFIG
# tests/test_launchers.py runs this script under stand-in srun / scontrol / torchrun that record what each node runs.
set -euo pipefail

CONFIG=${CONFIG:-examples/red/qwen25_32b_16gpu.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ -n "${SLURM_JOB_ID:-}" && -z "${INSIDE_SRUN:-}" ]]; then
  # Batch step (first node): $0 is slurmd's copy of the script, which the other nodes cannot read.
  submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
  script=${LAUNCH_SCRIPT:-$submit_dir/examples/red/launch_megatron_multinode.sh}
  if [[ ! -r "$script" ]]; then
    echo "error: $script is not readable: run sbatch from the repository root, on a file system every node" \
      "mounts, or set LAUNCH_SCRIPT to this script's path there" >&2
    exit 2
  fi
  # awk reads the whole list: `head -n 1` can end the pipe early, and the SIGPIPE fails the script (pipefail)
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
  cpus=${CPUS_PER_NODE:-${SLURM_CPUS_PER_TASK:-}}
  export MASTER_ADDR MASTER_PORT INSIDE_SRUN=1
  exec srun --nodes="${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}" --ntasks-per-node=1 ${cpus:+--cpus-per-task="$cpus"} \
    --kill-on-bad-exit=1 --chdir="$submit_dir" bash "$script" "$@"
fi

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}
CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_PER_TASK:-$(nproc)}}

overrides=(model.backend=megatron)
[[ -n "${TP:-}" ]] && overrides+=(model.tensor_model_parallel_size="$TP")
[[ -n "${PP:-}" ]] && overrides+=(model.pipeline_model_parallel_size="$PP")
[[ -n "${MICRO_BATCH:-}" ]] && overrides+=(trainer.micro_batch_size="$MICRO_BATCH")
[[ -n "${MAX_TOKENS:-}" ]] && overrides+=(trainer.max_tokens_per_micro_batch="$MAX_TOKENS")
[[ -n "${PROMPTS_PER_STEP:-}" ]] && overrides+=(trainer.prompts_per_step="$PROMPTS_PER_STEP")
[[ -n "${MODEL_PATH:-}" ]] && overrides+=(model.path="$MODEL_PATH")
[[ -n "${OUT_DIR:-}" ]] && overrides+=(trainer.out_dir="$OUT_DIR")

export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core: ordered TP communication / compute overlap
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_NODE / GPUS_PER_NODE > 0 ? CPUS_PER_NODE / GPUS_PER_NODE : 1 ))}
if [[ -n "${IFNAME:-}" ]]; then
  export NCCL_SOCKET_IFNAME=$IFNAME GLOO_SOCKET_IFNAME=$IFNAME
fi

exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m megatron_red.cli train --config "$CONFIG" "${overrides[@]}" "$@"
