#!/usr/bin/env bash
# One prepared run of the GPU checks, for a lent H100/H200 (a 15-minute device budget): each step under its own time
# limit so one slow step cannot take the others down; logs go to $OUT. Carry .whl (megatron-core, math-verify, pytest
# wheels) for the steps that need them: the lent GPU has torch, Triton and transformers but not megatron-core, so
# before the run `pip download --no-deps megatron-core==0.19.2 -d .whl` (a 2.4 MB cp312 manylinux wheel; the GPU's
# Python must be 3.12) and pass carry=[".whl"] to the device run.
#   bash tools/gpu_checks.sh                                  all steps
#   bash tools/gpu_checks.sh profile_backward megatron_train  chosen steps
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
run() {  # run NAME SECONDS CMD...: a step with a time limit, its log under $OUT
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -i -E "warn|deprecat" "$OUT/$name.log" | tail -n 45
  echo "=== $name: rc=$rc in $((SECONDS - start))s ==="
}
step() {
  case $1 in
    bench_kernels) run bench_kernels 210 python3 tools/bench_kernels.py --out "$OUT/bench_kernels.md" --compile-budget-s 40 ;;
    bench_kernels_nocompile) run bench_kernels 100 python3 tools/bench_kernels.py --out "$OUT/bench_kernels.md" --no-compile ;;
    profile_backward) run profile_backward 130 python3 tools/profile_kernel_backward.py --out "$OUT/profile_backward.md" ;;
    cuda_tests) run cuda_tests 100 python3 -m pytest -q -x -p no:cacheprovider -k cuda tests/test_kernels.py \
                  tests/test_rollout_local.py tests/test_hf_policy.py tests/test_paged_attention.py ;;
    megatron_smoke) run megatron_smoke 450 python3 tools/megatron_smoke.py --out "$OUT/megatron_smoke.md" ;;
    megatron_families) run megatron_families 150 bash -c "python3 tools/megatron_smoke.py --model-type qwen3 \
                         --groups 1 --skip-local --skip-hf && python3 tools/megatron_smoke.py --model-type llama3 \
                         --groups 1 --skip-local --skip-hf" ;;
    megatron_train) run megatron_train 100 env CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --standalone --nproc_per_node=1 \
                      -m megatron_red.cli train model.backend=megatron trainer.steps=3 trainer.save_every=2 \
                      trainer.eval_problems=16 trainer.tensorboard=false data.warmup_steps=20 \
                      trainer.out_dir=/tmp/mg_gpu/run ;;
    # After megatron_train: its checkpoint exported (dist_checkpointing model-only load on the GPU, streamed export)
    # must equal the run's own hf/ written at the end of training.
    megatron_export) run megatron_export 90 bash -c 'torchrun --standalone --nproc_per_node=1 -m megatron_red.cli \
                       export /tmp/mg_gpu/run --out /tmp/mg_gpu/export && python3 -c "
import glob, torch
from safetensors.torch import load_file
load = lambda d: {k: v for f in sorted(glob.glob(d + \"/*.safetensors\")) for k, v in load_file(f).items()}
a, b = load(\"/tmp/mg_gpu/run/hf\"), load(\"/tmp/mg_gpu/export\")
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \"export != run/hf\"
print(len(a), \"tensors equal, dtype\", next(iter(a.values())).dtype)"' ;;
    bench_rollout) run bench_rollout 130 python3 tools/bench_rollout.py --shapes 64x256 --engines local ;;
    # Issue 9 (under 8 minutes): the megatron engine (paged attention in Triton, no flash-attn) beside LocalEngine
    # at 64 x 512 and 512 x 1024 on the 1.5B shape, then one-GPU RED steps timed by phase with peak memory.
    megatron_rollout)
      run paged_attention_cuda 40 python3 -m pytest -q -x -p no:cacheprovider -k cuda tests/test_paged_attention.py
      run megatron_rollout 270 python3 tools/bench_rollout.py --skip-hf-generate --skip-train
      run red_step_megatron 150 env CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --standalone --nproc_per_node=1 \
        tools/bench_red_step.py --steps 2 ;;
    rollout_mismatch) run rollout_mismatch 150 python3 tools/rollout_mismatch.py --steps 4 --temperature 0.7 \
                        --tis-cap 2 data.warmup_steps=50 model.fused_kernel=on ;;
    *) echo "unknown step $1" ;;
  esac
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(bench_kernels cuda_tests megatron_smoke bench_rollout profile_backward megatron_train \
                                  megatron_export megatron_rollout)
for s in "${steps[@]}"; do step "$s"; done
echo "all done in ${SECONDS}s"
