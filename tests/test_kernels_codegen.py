"""Code the dZ kernel compiles to for Hopper (sm_90a), checked offline: Triton's compiler needs no GPU.

The backward's dZ kernel writes N x V bf16 values, so how it stores them matters as much as its matmul: a store
layout that puts a warp's lanes on different rows scatters every 2-byte value over its own 32-byte sector (with
that layout, under Triton 3.6, it ran at ~170 TFLOP/s on an H200 against the forward's ~620). These tests compile
it as the GPU would see it at the production shape (every pointer, size and stride divisible by 16) and assert
against the closed-form count of 16-byte stores one tile needs: BLOCK_N * BLOCK_V / (8 bf16 per store * 32
threads per warp * num_warps).
"""
from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
backend = pytest.importorskip("triton.backends.compiler")

from megatron_red.kernels import triton_kernels as tk  # noqa: E402

_DIVISIBLE_INTS = ("N", "D", "chunk_start", "chunk_cols", "stride_h", "stride_w")
_POINTER_TYPES = {"h_ptr": "*bf16", "w_ptr": "*bf16", "tgt_ptr": "*i64", "lse2_ptr": "*fp32",
                  "coef_p_ptr": "*fp32", "coef_logp_ptr": "*fp32", "coef_target_ptr": "*fp32", "dz_ptr": "*bf16"}


def _compile_grad_logits(block_n: int, block_v: int, block_k: int, num_warps: int, num_stages: int):
    fn = tk._grad_logits_kernel
    consts = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_K": block_k, "EVEN_K": True, "PRECISION": "tf32",
              "UPCAST": False}
    signature = {name: _POINTER_TYPES.get(name, "fp32" if name == "scale2" else
                                          "constexpr" if name in consts else "i32") for name in fn.arg_names}
    # What Triton's launcher specialises at N x d x V = 16384 x 1536 x 151936 with 2048-column chunks.
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in fn.arg_names if name in _POINTER_TYPES or name in _DIVISIBLE_INTS}
    src = compiler.ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                             attrs=attrs)
    try:
        kernel = triton.compile(src, target=backend.GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # e.g. a Triton build without the NVIDIA backend or its bundled ptxas
        pytest.skip(f"offline sm_90a compilation unavailable: {type(exc).__name__}: {exc}")
    return kernel.asm["ptx"]


@pytest.mark.parametrize("block_n, block_v", [(128, 128), (128, 256)])
def test_grad_logits_stores_16_byte_vectors_and_uses_wgmma(block_n, block_v):
    num_warps = 8
    ptx = _compile_grad_logits(block_n, block_v, 64, num_warps, 3)
    stores = re.findall(r"\bst\.global[.\w]*", ptx)
    assert stores == ["st.global.v4.b32"] * (block_n * block_v // (8 * 32 * num_warps)), stores
    # The logits matmul stays on Hopper's asynchronous warpgroup MMA, as in the forward.
    assert "wgmma.mma_async" in ptx
