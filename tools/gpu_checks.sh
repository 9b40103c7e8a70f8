#!/usr/bin/env bash
# The one prepared run of the GPU checks, for a lent H100 / H200 (15 minutes of device time per session, the
# machine's start of a few minutes included).
#
# Default steps, in the open issues' priority order; expected wall time on an H200 in brackets (estimates from the
# workloads and earlier runs: none of the issue 9 / 12 steps has run on a GPU yet):
#   1 (issue 9)  megatron_rollout  tools/bench_rollout.py: LocalEngine vs the megatron engine, both with CUDA graphs,
#                                  64 x 512 and 512 x 1024 on the random Qwen2.5-1.5B shape            [~75 s]
#                mcore_anchor      megatron-core's own dynamic engine + CUDA graphs + torch attention stand-in at
#                                  512 x 1024, the same shape (mcore_infer_anchor.py)                  [~75 s]
#                red_step          tools/bench_red_step.py: 2 RED steps, 1.5B shape, 64 prompts x 8 x 512 new
#                                  tokens, time and peak memory per phase, engine-vs-trainer mismatch   [~85 s]
#   (issue 26)   red_step_k4       the same in bf16 with 4 optimiser steps per rollout batch (the pi_old pass,
#                                  clip-higher 0.28): the K > 1 path's phases and clip fraction         [~90 s]
#   (issue 33)   te_red            tools/resume_check.py with Transformer Engine's spec (model.attention=te: fused
#                                  RoPE, TE checkpoint extra state), bf16, distributed optimizer, packed
#                                  micro-batches: 4 steps uninterrupted vs stopped at the step-2 checkpoint and
#                                  resumed. `attention: auto` moves to te only once this has passed and
#                                  docs/benchmarks.md records it. Needs TE (the NGC image has it; the lent
#                                  machines so far do not: exit code 3 in seconds)                     [~200 s]
#                packed_rope       tools/packed_rope_check.py: packed vs padded log-probs and the host syncs of
#                                  megatron's unfused packed RoPE (sdpa), and of TE's fused one if installed [~45 s]
#                offload           tools/offload_bench.py: optimizer state to host and back, pinned buffers and
#                                  non-blocking copies vs megatron's offload_to_cpu (GB/s)              [~40 s]
#   2 (issue 12) megatron_smoke    tools/megatron_smoke.py --groups 1: Megatron SDPA padded / packed, local-spec
#                                  attention, HF backend; tokens/s, MFU, peak, planned vs measured      [~70 s]
#                hf_anchor         plain transformers training step, 4 x 4096 and 8 x 4096 + checkpointing
#                                  (hf_step_anchor.py; its HF generate row is skipped: measured before) [~30 s]
#   3            cuda_tests        pytest -k cuda: compiled Triton paged attention against float64, fused LM-head
#                                  kernel (autotuned) against float64, CUDA-graph decode vs eager       [~45 s]
#                rollout_mismatch  tools/rollout_mismatch.py: bf16 engine vs trainer log-probs, TIS       [~35 s]
#   4 (issue 12) bench_kernels     tools/bench_kernels.py: the full kernel table, torch.compile included [~95 s]
# Expected total about 12 minutes with the set-up where Transformer Engine is missing (te_red then stops at once; about
# 15 with it): the budget skips the last steps (bench_kernels first). Every step has its own time limit, and a global budget
# (GPU_CHECKS_BUDGET_S, default 540 s from the start) caps each limit at what is left, so the default list ends within
# 9 minutes whatever happens; a step that no longer fits is reported as skipped (lowest priority last).
# Other steps, by name: bench_kernels_nocompile, profile_backward, megatron_families, megatron_train, bench_rollout
# (the HF-backend rows: HF generate, LocalEngine eager / graph, HFPolicy training step), megatron_train_bf16 (issue
# 26: `megatron-red train` in bf16 with the distributed optimizer, rollout.offload_optimizer, K = 2, a checkpoint,
# the HF export and the evaluation, end to end on the GPU), step_overhead (issue 26: RED over GRPO at equal tokens,
# HF backend, the 1.5B's width and vocabulary with 12 layers (two policies fit), 2048-token rows: there the
# per-micro-batch overheads that dominate the CPU toy's ratio are small against the work), megatron_moe (issue 32: the
# built-in student as an 8-expert Qwen3-MoE on the Megatron backend, EP 1, one GPU: 3 RED steps of
# tools/rollout_mismatch.py in bf16 without and with routing replay, and in fp32 without: moe/routing_mismatch and the
# engine-vs-trainer log-prob mismatch per step, ~60 s each), vllm_rollout (issue 31: the vLLM engine beside
# LocalEngine and the megatron engine, with its refit time; needs vLLM on the GPU machine).
#
# Before the device run, in the repository root of this (CPU) machine:
#   python3 -m pip download megatron-core==0.19.2 --no-deps -d .whl   # 2.4 MB cp312 manylinux x86-64 wheel: run it
#       with a Python 3.12 on x86-64 (e.g. /work/main/.venv/bin/python -m pip ...); the GPU machine has torch,
#       Triton, transformers and pytest but no megatron-core, no Transformer Engine, no flash-attn, no internet.
#   mkdir -p .devcarry/anchors && cp /work/shared/tools/mcore_infer_anchor.py /work/shared/tools/hf_step_anchor.py \
#       .devcarry/anchors/                                            # ../shared does not travel
# then: run(command="bash tools/gpu_checks.sh", carry=[".whl", ".devcarry"], timeout_s=600). .whl/ and .devcarry/
# are git-ignored.
#   bash tools/gpu_checks.sh                           the default steps
#   bash tools/gpu_checks.sh red_step megatron_train   chosen steps, in that order
#   GPU_CHECKS_DRY_RUN=1 bash tools/gpu_checks.sh      print each step's command instead (tests/test_gpu_checks.py)
# Results come back from $OUT (the device tool returns at most 8 files): gpu_checks.log (every step's whole output),
# summary.md (rc, seconds, limit per step), bench_kernels.md, megatron_smoke.md, mcore_infer_anchor.json,
# hf_step_anchor.json. Scratch (run directories, the 1.5B warm-up checkpoint: gigabytes) goes to $SCRATCH, outside
# $OUT, so it neither crowds the results out nor travels.
set -u
OUT=${OUT:-/tmp/gpu_checks}
SCRATCH=${SCRATCH:-/tmp/gpu_checks_scratch}
ANCHORS=${ANCHORS:-.devcarry/anchors}
BUDGET=${GPU_CHECKS_BUDGET_S:-540}
DRY=${GPU_CHECKS_DRY_RUN:-}
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TMPDIR="$SCRATCH"
LOG="$OUT/gpu_checks.log"
SUMMARY="$OUT/summary.md"

# Runs an anchor script of ../shared/tools unchanged, after a CUDA check; `--skip-generate` makes HF generate raise
# inside hf_step_anchor.py's own try/except (its row then reads "error: skipped ...").
ANCHOR_RUNNER='import runpy, sys, torch
path, skip_generate = sys.argv[1], sys.argv[2:] == ["--skip-generate"]
if not torch.cuda.is_available():
    sys.exit(f"{path} needs a CUDA GPU (none is visible to torch)")
if skip_generate:
    import transformers
    def skipped(*args, **kwargs):
        raise RuntimeError("HF generate skipped by gpu_checks.sh (measured before: 720 tokens/s at 64 x 256)")
    transformers.GenerationMixin.generate = skipped
sys.argv = [path]
runpy.run_path(path, run_name="__main__")'

record() {  # record NAME RC SECONDS LIMIT
  [ -n "$DRY" ] || echo "| $1 | $2 | $3 | $4 |" >> "$SUMMARY"
}
run() {  # run NAME LIMIT CMD...: one step under min(LIMIT, what is left of the budget); output to $LOG
  local name=$1 limit=$2; shift 2
  if [ -n "$DRY" ]; then
    echo "=== $name (limit ${limit}s)"
    printf '$'; printf ' %q' "$@"; echo
    return
  fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left ===" | tee -a "$LOG"
    record "$name" skipped 0 "$limit"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS step_log="$SCRATCH/$name.log"
  timeout --kill-after=10 "$limit" "$@" > "$step_log" 2>&1
  local rc=$? took=$((SECONDS - start))
  { echo "=== $name: rc=$rc in ${took}s (limit ${limit}s) ==="; cat "$step_log"; echo; } >> "$LOG"
  grep -v -i -E "warn|deprecat" "$step_log" | tail -n 45
  echo "=== $name: rc=$rc in ${took}s ==="
  record "$name" "$rc" "$took" "$limit"
}
anchor() {  # anchor NAME LIMIT FILE [ENV=VALUE ...] [-- ARGS]: an anchor script, if it was carried
  local name=$1 limit=$2 file=$3; shift 3
  local path="$ANCHORS/$file"
  [ -f "$path" ] || [ ! -f "../shared/tools/$file" ] || path="../shared/tools/$file"
  if [ -z "$DRY" ] && [ ! -f "$path" ]; then
    echo "=== $name: skipped, $file not found in $ANCHORS (see the header: copy it there and carry .devcarry) ===" \
      | tee -a "$LOG"
    record "$name" "skipped (no anchor)" 0 "$limit"
    return
  fi
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ $# -eq 0 ] || shift
  run "$name" "$limit" env "${envs[@]}" python3 -c "$ANCHOR_RUNNER" "$path" "$@"
}
step() {
  case $1 in
    # 1. Issue 9: the megatron engine beside LocalEngine, megatron-core's own engine at the same shape, a RED step.
    megatron_rollout) run megatron_rollout 100 python3 tools/bench_rollout.py --skip-hf-generate --skip-train \
                        --engines local-graph,megatron-graph --shapes 64x512,512x1024 ;;
    # The anchor's own budget: it starts a variant with >= 60 s of it left and cuts its timed run at what is
    # left - 20 s; 100 s leaves the ~31 s that 512 x 1024 takes at its 16.7k tokens/s.
    mcore_anchor) anchor mcore_anchor 105 mcore_infer_anchor.py MCORE_VARIANTS=dyn_cgraph_256 MCORE_N_BIG=512 \
                    MCORE_NEW_TOK=1024 MCORE_BUDGET_S=100 ;;
    red_step) run red_step 110 env CUDA_DEVICE_MAX_CONNECTIONS=1 python3 -m torch.distributed.run --standalone \
                --nproc_per_node=1 tools/bench_red_step.py --steps 2 ;;
    # Issue 26: the K > 1 update (forward-only pi_old pass, 4 optimiser steps, clip-higher) in bf16.
    red_step_k4) run red_step_k4 110 env CUDA_DEVICE_MAX_CONNECTIONS=1 python3 -m torch.distributed.run --standalone \
                   --nproc_per_node=1 tools/bench_red_step.py --steps 2 model.dtype=bfloat16 \
                   trainer.mini_batches_per_step=4 "algo.loss={clip_eps_high: 0.28}" ;;
    # Issue 33: Transformer Engine's spec through a save and a resume; packed RoPE; the optimizer offload.
    te_red) run te_red 240 python3 tools/resume_check.py --steps 4 --save-at 2 model.attention=te \
              model.dtype=bfloat16 model.use_distributed_optimizer=true trainer.max_tokens_per_micro_batch=1024 ;;
    packed_rope) run packed_rope 90 python3 tools/packed_rope_check.py ;;
    offload) run offload 90 python3 tools/offload_bench.py ;;
    # 2. Issue 12: the Megatron training step (SDPA, packing) against the HF backend and plain transformers.
    megatron_smoke) run megatron_smoke 100 python3 tools/megatron_smoke.py --groups 1 --out "$OUT/megatron_smoke.md" ;;
    hf_anchor) anchor hf_anchor 50 hf_step_anchor.py -- --skip-generate ;;
    # 3. CUDA tests (compiled Triton paged attention, fused kernel, CUDA-graph decode) and the rollout mismatch.
    cuda_tests) run cuda_tests 60 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_paged_attention.py \
                  tests/test_kernels.py tests/test_rollout_local.py ;;
    rollout_mismatch) run rollout_mismatch 50 python3 tools/rollout_mismatch.py --steps 4 --temperature 0.7 \
                        --tis-cap 2 data.warmup_steps=50 model.fused_kernel=on model.device=cuda ;;
    # 4. Issue 12: the full kernel table.
    bench_kernels) run bench_kernels 110 python3 tools/bench_kernels.py --out "$OUT/bench_kernels.md" \
                     --compile-budget-s 30 ;;
    # By name only.
    bench_kernels_nocompile) run bench_kernels 80 python3 tools/bench_kernels.py --out "$OUT/bench_kernels.md" \
                               --no-compile ;;
    profile_backward) run profile_backward 130 python3 tools/profile_kernel_backward.py \
                        --out "$OUT/profile_backward.md" ;;
    megatron_families) for family in qwen3 llama3; do
                         run "megatron_smoke_$family" 75 python3 tools/megatron_smoke.py --model-type "$family" \
                           --groups 1 --skip-local --skip-hf
                       done ;;
    megatron_train) run megatron_train 100 env CUDA_DEVICE_MAX_CONNECTIONS=1 python3 -m torch.distributed.run \
                      --standalone --nproc_per_node=1 -m megatron_red.cli train model.backend=megatron trainer.steps=3 \
                      trainer.save_every=2 trainer.eval_problems=16 trainer.tensorboard=false data.warmup_steps=20 \
                      "trainer.out_dir=$SCRATCH/megatron_train" ;;
    megatron_train_bf16) run megatron_train_bf16 110 env CUDA_DEVICE_MAX_CONNECTIONS=1 python3 -m torch.distributed.run \
                           --standalone --nproc_per_node=1 -m megatron_red.cli train model.backend=megatron \
                           model.dtype=bfloat16 model.use_distributed_optimizer=true rollout.offload_optimizer=true \
                           trainer.mini_batches_per_step=2 trainer.steps=3 trainer.save_every=2 \
                           trainer.eval_problems=16 trainer.tensorboard=false data.warmup_steps=20 \
                           "trainer.out_dir=$SCRATCH/megatron_train_bf16" ;;
    # After megatron_train: its checkpoint exported (dist_checkpointing model-only load on the GPU, streamed export)
    # must equal the run's own hf/ written at the end of training.
    megatron_export) run megatron_export 90 bash -c 'python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
                       -m megatron_red.cli export "$SCRATCH/megatron_train" --out "$SCRATCH/megatron_export" && python3 -c "
import glob, os, torch
from safetensors.torch import load_file
load = lambda d: {k: v for f in sorted(glob.glob(d + \"/*.safetensors\")) for k, v in load_file(f).items()}
a, b = load(os.environ[\"SCRATCH\"] + \"/megatron_train/hf\"), load(os.environ[\"SCRATCH\"] + \"/megatron_export\")
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \"export != run/hf\"
print(len(a), \"tensors equal, dtype\", next(iter(a.values())).dtype)"' ;;
    step_overhead) run step_overhead 120 python3 tools/bench_step_overhead.py --device cuda --hidden 1536 --layers 12 \
                     --vocab 151936 --length 2048 --micro-batch-size 4 --reps 6 ;;
    bench_rollout) run bench_rollout 130 python3 tools/bench_rollout.py --shapes 64x256 --engines local ;;
    # Issue 31, for a GPU machine with vLLM installed (pip install -e ".[vllm]"; the lent machines have none and its
    # CUDA wheel is too large to carry): the vLLM engine beside LocalEngine and the megatron engine, CUDA graphs,
    # the refit time, on the random Qwen2.5-1.5B shape.
    vllm_rollout) run vllm_rollout 240 python3 tools/bench_rollout.py --skip-hf-generate --skip-train \
                    --engines local-graph,megatron-graph,vllm-graph --shapes 64x512,512x1024 ;;
    # Issue 32: a mixture-of-experts student on one GPU (EP 1), the megatron engine recording and the trainer
    # replaying its routing; what replay changes in bf16, against fp32.
    megatron_moe) for variant in "bfloat16 false" "bfloat16 true" "float32 false"; do
                    set -- $variant
                    run "megatron_moe_${1}_replay_$2" 75 env CUDA_DEVICE_MAX_CONNECTIONS=1 python3 -m \
                      torch.distributed.run --standalone --nproc_per_node=1 tools/rollout_mismatch.py --steps 3 \
                      model.backend=megatron model.num_experts=8 "model.dtype=$1" "model.moe_routing_replay=$2" \
                      data.warmup_steps=50
                  done ;;
    *) echo "unknown step $1" ;;
  esac
}
DEFAULT_STEPS=(megatron_rollout mcore_anchor red_step red_step_k4 te_red packed_rope offload megatron_smoke hf_anchor
               cuda_tests rollout_mismatch bench_kernels)
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=("${DEFAULT_STEPS[@]}")
if [ -z "$DRY" ]; then
  mkdir -p "$OUT" "$SCRATCH"
  printf '| step | rc | seconds | limit |\n|---|---|---|---|\n' > "$SUMMARY"
  : > "$LOG"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  if [ -d .whl ]; then
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  timeout 60 python3 -c "import importlib.util, torch, triton, transformers
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| triton', triton.__version__,
      '| transformers', transformers.__version__, '| megatron-core',
      'present' if importlib.util.find_spec('megatron.core') else 'MISSING: carry .whl (see the header)')" 2>&1 \
    | tee -a "$LOG"
fi
for s in "${steps[@]}"; do step "$s"; done
if [ -z "$DRY" ]; then
  echo "all done in ${SECONDS}s" | tee -a "$LOG"
  cat "$SUMMARY"
fi
