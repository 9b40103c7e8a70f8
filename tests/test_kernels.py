"""`megatron_red.kernels` on CPU without Triton's interpreter: input checks, the reference, and the torch fallback.

The Triton kernels themselves are tested in test_kernels_interpreter.py (a subprocess with TRITON_INTERPRET=1);
CUDA cannot exist here, so the GPU path is exercised by tools/bench_kernels.py on a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megatron_red.kernels import (
    FusedKernelConfig,
    fused_kernel_enabled,
    fused_linear_logprobs_entropy,
    reference_linear_logprobs_entropy,
)
from megatron_red.kernels.fused_linear_logprobs import _forward_split, _grad_chunk_cols


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    # Off CUDA and without the interpreter the public function must take the torch fallback.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _inputs(n=23, d=12, v=50, dtype=torch.float32, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 2.0 / d**0.5).to(dtype)
    targets = torch.randint(0, v, (*lead, n), generator=g)
    return hidden, weight, targets


def _rel(x, ref):
    return float((x.detach().double() - ref.detach()).norm() / ref.detach().norm())


def test_reference_matches_closed_form_for_uniform_logits():
    # W = 0 gives equal logits over the valid vocabulary: log pi = -log V_valid, H = log V_valid.
    hidden, _, targets = _inputs(v=40)
    weight = torch.zeros(40, hidden.shape[1])
    targets = targets % 30
    lp, ent = reference_linear_logprobs_entropy(hidden, weight, targets, valid_vocab_size=30, dtype=torch.float64)
    assert torch.allclose(lp, torch.full_like(lp, -math.log(30)), atol=1e-12)
    assert torch.allclose(ent, torch.full_like(ent, math.log(30)), atol=1e-12)


def test_fused_kernel_auto_is_on_for_cuda_devices_only():
    assert not fused_kernel_enabled("auto", "cpu") and not fused_kernel_enabled("auto", torch.device("meta"))
    assert fused_kernel_enabled("auto", torch.device("cuda", 3))  # the device type decides: plan resolves it too
    assert fused_kernel_enabled("on", "cpu") and not fused_kernel_enabled("off", "cuda")


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-3)])
def test_cpu_fallback_matches_float64(dtype, grad_tol):
    hidden, weight, targets = _inputs(dtype=dtype, lead=(2,))  # [2, 23, d]: leading dims are kept
    a, b = torch.randn(2, 23, dtype=torch.float64), torch.randn(2, 23, dtype=torch.float64)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    config = FusedKernelConfig(fallback_chunk_rows=10)  # several chunks, each checkpointed
    lp, ent = fused_linear_logprobs_entropy(h, w, targets % 45, temperature=0.6, valid_vocab_size=45, config=config)
    assert lp.shape == ent.shape == (2, 23) and lp.dtype == ent.dtype == torch.float32
    (lp * a + ent * b).sum().backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rlp, rent = reference_linear_logprobs_entropy(h64, w64, targets % 45, 0.6, 45, torch.float64)
    (rlp * a + rent * b).sum().backward()
    assert _rel(lp, rlp) < 1e-5 and _rel(ent, rent) < 1e-5
    assert _rel(h.grad, h64.grad) < grad_tol and _rel(w.grad, w64.grad) < grad_tol
    assert torch.all(w.grad[45:] == 0)


def _fallback_tp_rank(rank, world_size):
    hidden, weight, targets = _inputs(n=19, d=10, v=64, seed=3)
    # The loss weights must be the same on every rank, as a replicated loss is.
    a, b = torch.randn(2, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v_shard = 64 // world_size
    rows = slice(rank * v_shard, (rank + 1) * v_shard)
    h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
    lp, ent = fused_linear_logprobs_entropy(h, w, targets % 50, tp_group=dist.group.WORLD, temperature=1.5,
                                            valid_vocab_size=50, config=FusedKernelConfig(fallback_chunk_rows=7))
    (lp * a + ent * b).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rlp, rent = reference_linear_logprobs_entropy(h64, w64, targets % 50, 1.5, 50, torch.float64)
    (rlp * a + rent * b).sum().backward()
    return [_rel(lp, rlp), _rel(ent, rent), _rel(h.grad, h64.grad), _rel(w.grad, w64.grad[rows])]


def test_cpu_fallback_tensor_parallel_matches_single_process_float64():
    for rank_errors in run_distributed(_fallback_tp_rank, 2):
        assert max(rank_errors) < 1e-5, rank_errors


def test_value_errors():
    hidden, weight, targets = _inputs()
    f = fused_linear_logprobs_entropy
    with pytest.raises(ValueError, match="hidden size mismatch"):
        f(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="targets shape"):
        f(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="integer"):
        f(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="dtype"):
        f(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        f(hidden.long(), weight, targets)
    with pytest.raises(ValueError, match="on meta"):
        f(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="targets are on"):
        f(hidden, weight, targets.to("meta"))
    with pytest.raises(ValueError, match=r"\[V_shard, d\]"):
        f(hidden, weight[0], targets)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., d\]"):
        f(hidden[0], weight, targets[0])
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="valid_vocab_size"):
        f(hidden, weight, targets, valid_vocab_size=weight.shape[0] + 1)


def test_forward_split_and_backward_chunk_cover_the_vocabulary():
    # 16384 tokens x 151936 columns on 132 SMs: whole 256-column units, enough programs, no empty split.
    split_cols, n_splits = _forward_split(16384, 151936, 128, 256, 132, None)
    assert split_cols % 256 == 0 and split_cols * n_splits >= 151936 > split_cols * (n_splits - 1)
    assert 128 * n_splits >= 8 * 132
    # Few tokens: many splits; never more splits than units.
    assert _forward_split(64, 1000, 128, 256, 132, None) == (256, 4)
    # The dZ buffers together fit the byte budget: 128 MiB of bf16 at N = 16384 is 4096 columns in one buffer,
    # 2048 in each of two.
    assert _grad_chunk_cols(16384, 151936, 2, FusedKernelConfig(grad_buffers=1)) == 4096
    assert _grad_chunk_cols(16384, 151936, 2, FusedKernelConfig(grad_buffers=2)) == 2048
    assert _grad_chunk_cols(16384, 151936, 2, FusedKernelConfig(grad_chunk_bytes=160 * 2**20, grad_buffers=2)) == 2560
    assert _grad_chunk_cols(100, 300, 2, FusedKernelConfig()) == 300


@pytest.mark.parametrize("field,value", [("grad_buffers", 0), ("grad_num_warps", -1), ("grad_group_rows", 1.5),
                                         ("grad_blocks", (128, 128)), ("blocks", (16, 0, 16)),
                                         ("grad_chunk_bytes", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        FusedKernelConfig(**{field: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the autotuned Triton path)")
@pytest.mark.parametrize("dtype,value_tol,grad_tol,grad_buffers",
                         [(torch.bfloat16, 1e-4, 6e-3, 2), (torch.float32, 1e-5, 1e-5, 2),
                          (torch.bfloat16, 1e-4, 6e-3, 1)])
def test_cuda_triton_path_matches_float64(dtype, value_tol, grad_tol, grad_buffers):
    hidden, weight, targets = _inputs(n=777, d=200, v=3000, dtype=dtype, seed=5)
    hidden, weight, targets = hidden.cuda(), weight.cuda(), targets.cuda() % 2900
    a, b = torch.randn(2, 777, dtype=torch.float64, device="cuda")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fused_linear_logprobs_entropy(h, w, targets, temperature=0.9, valid_vocab_size=2900,
                                            config=FusedKernelConfig(grad_chunk_cols=1024,
                                                                     grad_buffers=grad_buffers))
    (lp * a + ent * b).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rlp, rent = reference_linear_logprobs_entropy(h64, w64, targets, 0.9, 2900, torch.float64)
    (rlp * a + rent * b).sum().backward()
    assert _rel(lp, rlp) < value_tol and _rel(ent, rent) < value_tol
    assert _rel(h.grad, h64.grad) < grad_tol and _rel(w.grad, w64.grad) < grad_tol
    assert torch.all(w.grad[2900:] == 0)
