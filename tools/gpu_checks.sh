#!/usr/bin/env bash
# One prepared run of every GPU check, for a lent H100/H200 (a 15-minute device budget): correctness first, then
# the benchmarks, each under its own time limit so one slow step cannot take the others down. Logs go to $OUT.
#   bash tools/gpu_checks.sh            (carry .whl: megatron-core, math-verify, pytest wheels; see docs/benchmarks.md)
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
  tail -n 60 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start))s ==="
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
run bench_kernels 210 python3 tools/bench_kernels.py --out "$OUT/bench_kernels.md" --compile-budget-s 40
run cuda_tests 100 python3 -m pytest -q -x -p no:cacheprovider -k cuda tests/test_kernels.py tests/test_rollout_local.py tests/test_hf_policy.py
run megatron_smoke 120 python3 tools/megatron_smoke.py
run bench_rollout 130 python3 tools/bench_rollout.py --new-tokens 256
echo "all done in ${SECONDS}s"
