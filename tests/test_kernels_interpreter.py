"""The Triton kernels of `megatron_red.kernels`, run on CPU by Triton's interpreter, against float64.

TRITON_INTERPRET=1 must be set before the kernels are defined, so the test re-runs this file in a subprocess with
the variable set; that process runs every case (including a 2-rank gloo tensor-parallel one, whose spawned ranks
inherit the variable) and prints the relative errors as JSON for the test to check. Shapes are tiny and not
multiples of the (16, 32, 16) blocks, so masking, vocabulary splits, grouped program ids and several backward
chunks are all exercised.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# bf16 gradients are rounded twice (dZ chunk and the output itself), ~1e-3 relative each; values use fp32 logits.
TOLERANCES = {
    "float32": {"logprobs": 1e-5, "entropy": 1e-5, "grad_hidden": 1e-5, "grad_weight": 1e-5},
    "bfloat16": {"logprobs": 1e-5, "entropy": 1e-5, "grad_hidden": 6e-3, "grad_weight": 6e-3},
    "float16": {"logprobs": 1e-5, "entropy": 1e-5, "grad_hidden": 2e-3, "grad_weight": 2e-3},
}

CASES = [
    # name, dtype, N, d, V, temperature, valid_vocab_size, splits, grad_chunk_cols, entropy-only loss, other
    # FusedKernelConfig fields (the backward's buffer rotation and its own tile are exercised; the side stream
    # itself needs CUDA)
    ("fp32_padded_vocab", "float32", 37, 24, 90, 0.7, 83, 3, 40, False, {}),
    ("bf16", "bfloat16", 40, 32, 100, 1.3, None, None, None, False, {}),
    ("fp16_entropy_only", "float16", 21, 20, 70, 1.0, 64, 2, 33, True, {}),
    ("fp32_three_buffers_grad_tile", "float32", 29, 24, 77, 0.9, None, None, 16, False,
     {"grad_buffers": 3, "grad_blocks": (16, 16, 16), "grad_num_stages": 4, "grad_group_rows": 3}),
    ("bf16_one_buffer", "bfloat16", 33, 16, 60, 1.0, 55, None, 24, False, {"grad_buffers": 1}),
]


def _rel(x, ref) -> float:
    return float((x.detach().double() - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-30))


def _errors(hidden, weight, targets, a, b, temperature, valid_vocab_size, tp_group=None, shard=None, config=None):
    """Relative errors of the fused function (on `shard` rows of `weight`) against the float64 reference."""
    import torch

    from megatron_red.kernels import fused_linear_logprobs_entropy, reference_linear_logprobs_entropy

    rows = slice(None) if shard is None else shard
    h = hidden.clone().requires_grad_()
    w = weight[rows].clone().requires_grad_()
    lp, ent = fused_linear_logprobs_entropy(h, w, targets, tp_group=tp_group, temperature=temperature,
                                            valid_vocab_size=valid_vocab_size, config=config)
    (lp * a + ent * b).sum().backward()

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    rlp, rent = reference_linear_logprobs_entropy(h64, w64, targets, temperature, valid_vocab_size, torch.float64)
    (rlp * a.double() + rent * b.double()).sum().backward()
    padded_rows_zero = True
    if valid_vocab_size is not None:
        padded = torch.arange(weight.shape[0])[rows] >= valid_vocab_size
        padded_rows_zero = bool((w.grad[padded] == 0).all())
    return {"logprobs": _rel(lp, rlp), "entropy": _rel(ent, rent), "grad_hidden": _rel(h.grad, h64.grad),
            "grad_weight": _rel(w.grad, w64.grad[rows]), "padded_rows_zero": padded_rows_zero,
            "dtypes_ok": lp.dtype == torch.float32 and ent.dtype == torch.float32 and h.grad.dtype == h.dtype}


def _inputs(dtype_name, n, d, v, valid, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 2.0 / d**0.5).to(dtype)
    targets = torch.randint(0, valid or v, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return hidden, weight, targets, a, b


def _tp_rank(rank, world_size, valid_vocab_size):
    import torch.distributed as dist

    from megatron_red.kernels import FusedKernelConfig

    hidden, weight, targets, a, b = _inputs("float32", 27, 20, 96, valid_vocab_size, seed=7)
    v_shard = weight.shape[0] // world_size
    config = FusedKernelConfig(splits=2, grad_chunk_cols=20, grad_group_rows=2)
    return _errors(hidden, weight, targets, a, b, 0.8, valid_vocab_size, tp_group=dist.group.WORLD,
                   shard=slice(rank * v_shard, (rank + 1) * v_shard), config=config)


def _run_all() -> dict:
    import torch

    from megatron_red.kernels import FusedKernelConfig
    from dist_utils import run_distributed

    torch.set_num_threads(1)
    results = {}
    for name, dtype, n, d, v, temp, valid, splits, chunk, entropy_only, extra in CASES:
        hidden, weight, targets, a, b = _inputs(dtype, n, d, v, valid, seed=len(results))
        if entropy_only:
            a = torch.zeros_like(a)
        # 2 row blocks per L2 group: with these few row blocks, the default 8 would leave one group only.
        config = FusedKernelConfig(splits=splits, grad_chunk_cols=chunk, **{"grad_group_rows": 2, **extra})
        results[name] = _errors(hidden, weight, targets, a, b, temp, valid, config=config)
    # Rank 1 holds padding rows (valid 90 of 96), then only padding (valid 40 < V_shard = 48).
    for valid in (90, 40):
        for rank, errs in enumerate(run_distributed(_tp_rank, 2, valid)):
            results[f"tp2_valid{valid}_rank{rank}"] = errs
    return results


@pytest.mark.timeout(240)
def test_triton_kernels_under_interpreter_match_float64():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=230,
                          cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = [c[0] for c in CASES] + [f"tp2_valid{v}_rank{r}" for v in (90, 40) for r in (0, 1)]
    assert sorted(results) == sorted(expected)
    for name, errs in results.items():
        dtype = next((c[1] for c in CASES if c[0] == name), "float32")
        for key, tol in TOLERANCES[dtype].items():
            assert errs[key] <= tol, f"{name}: {key} relative error {errs[key]:.3g} > {tol}"
        assert errs["padded_rows_zero"], f"{name}: padded vocabulary rows got a gradient"
        assert errs["dtypes_ok"], f"{name}: wrong output or gradient dtype"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run through pytest, or with TRITON_INTERPRET=1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_run_all()))
