"""vocab_parallel_logprobs_entropy against a float64 log_softmax reference and megatron-core.

Tensor parallelism runs on gloo process groups on CPU (tests/dist_utils.run_distributed): TP = 1 in-process,
TP = 4 on the world group and TP = 2 on two explicit subgroups of a 4-process world, TP = 2 against
megatron-core's vocab_parallel_cross_entropy. Every rank builds the same full-vocabulary logits from a seed,
takes its shard, and checks values and its gradient slice against the float64 reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megatron_red.kernels import vocab_parallel_logprobs_entropy

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradient tolerances: the gradient is computed in fp32 and returned in the input dtype, so it carries that
# dtype's rounding; log-probs and entropy are fp32 outputs for every input dtype.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
            torch.float16: dict(rtol=1e-3, atol=1e-6)}
VALUE_TOL = dict(rtol=1e-5, atol=2e-5)


def make_case(seed: int, shape: tuple[int, ...], vocab: int, dtype: torch.dtype, valid_vocab: int | None = None,
              extreme: bool = False):
    """Full-vocabulary logits in `dtype`, targets in the valid vocabulary, and upstream grads for both outputs."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(*shape, vocab, generator=gen)
    if extreme:
        # A third of the logits near +1e4 (several compete for the mass), a third near -1e4.
        pick = torch.randint(0, 3, logits.shape, generator=gen)
        logits = torch.where(pick == 1, 1e4 + logits, torch.where(pick == 2, -1e4 + logits, logits))
    logits = logits.to(dtype)
    targets = torch.randint(0, valid_vocab or vocab, shape, generator=gen)
    grad_logprobs = torch.randn(shape, generator=gen)
    grad_entropy = torch.randn(shape, generator=gen)
    return logits, targets, grad_logprobs, grad_entropy


def reference(logits, targets, grad_logprobs, grad_entropy, valid_vocab: int | None = None):
    """Float64 log-probs, entropy and d(g_lp . logprobs + g_H . entropy)/d logits from torch.log_softmax."""
    z = logits.double().requires_grad_()
    log_p = torch.log_softmax(z[..., :valid_vocab], dim=-1)
    logprobs = log_p.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    (logprobs * grad_logprobs.double() + entropy * grad_entropy.double()).sum().backward()
    return logprobs.detach(), entropy.detach(), z.grad


def run_shard(logits, targets, grad_logprobs, grad_entropy, tp_rank, tp_size, tp_group, **kwargs):
    v_shard = logits.shape[-1] // tp_size
    shard = logits[..., tp_rank * v_shard:(tp_rank + 1) * v_shard].clone().requires_grad_()
    logprobs, entropy = vocab_parallel_logprobs_entropy(shard, targets, tp_group=tp_group, **kwargs)
    (logprobs * grad_logprobs + entropy * grad_entropy).sum().backward()
    return logprobs.detach(), entropy.detach(), shard.grad


def check_against_reference(logits, targets, g_lp, g_h, tp_rank, tp_size, tp_group, valid_vocab=None, **kwargs):
    logprobs, entropy, grad = run_shard(logits, targets, g_lp, g_h, tp_rank, tp_size, tp_group,
                                        valid_vocab_size=valid_vocab, **kwargs)
    ref_lp, ref_h, ref_grad = reference(logits, targets, g_lp, g_h, valid_vocab)
    v_shard = logits.shape[-1] // tp_size
    ref_grad_shard = ref_grad[..., tp_rank * v_shard:(tp_rank + 1) * v_shard]
    assert logprobs.dtype == entropy.dtype == torch.float32 and grad.dtype == logits.dtype
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(logprobs.double(), ref_lp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), ref_h, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad_shard, **GRAD_TOL[logits.dtype])
    if valid_vocab is not None:
        padded_local = max(0, (tp_rank + 1) * v_shard - max(valid_vocab, tp_rank * v_shard))
        assert torch.equal(grad[..., v_shard - padded_local:], torch.zeros_like(grad[..., v_shard - padded_local:]))


# ---------------------------------------------------------------- TP = 1 (the whole vocabulary local)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 100])
@pytest.mark.parametrize("valid_vocab", [None, 23])
def test_single_rank_matches_float64_reference(dtype, chunk_size, valid_vocab):
    logits, targets, g_lp, g_h = make_case(0, (2, 7), 29, dtype, valid_vocab)  # 14 tokens: 5 does not divide
    check_against_reference(logits, targets, g_lp, g_h, 0, 1, None, valid_vocab, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_stay_finite_and_exact(dtype):
    logits, targets, g_lp, g_h = make_case(1, (3, 4), 16, dtype, extreme=True)
    assert logits.abs().max() > 9000
    check_against_reference(logits, targets, g_lp, g_h, 0, 1, None, chunk_size=5)


def test_one_hot_distribution_has_zero_entropy_and_target_logprob_zero():
    logits = torch.full((2, 6), -1e4)
    logits[0, 2] = logits[1, 5] = 1e4
    logprobs, entropy = vocab_parallel_logprobs_entropy(logits, torch.tensor([2, 5]))
    assert torch.equal(logprobs, torch.zeros(2)) and torch.equal(entropy, torch.zeros(2))


def test_single_output_backward_matches_reference():
    logits, targets, g_lp, _ = make_case(2, (5,), 12, torch.float32)
    shard = logits.clone().requires_grad_()
    logprobs, _ = vocab_parallel_logprobs_entropy(shard, targets, chunk_size=2)
    (logprobs * g_lp).sum().backward()
    _, _, ref_grad = reference(logits, targets, g_lp, torch.zeros(5))
    torch.testing.assert_close(shard.grad.double(), ref_grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_not_modified(dtype):
    logits, targets, g_lp, g_h = make_case(3, (2, 3), 10, dtype, valid_vocab=9)
    shard = logits.clone().requires_grad_()
    logprobs, entropy = vocab_parallel_logprobs_entropy(shard, targets, chunk_size=4, valid_vocab_size=9)
    (logprobs * g_lp + entropy * g_h).sum().backward()
    assert torch.equal(shard.detach(), logits)


def test_backward_saves_input_logits_not_fp32_copies():
    logits, targets, _, _ = make_case(4, (4, 3), 20, torch.bfloat16)
    shard = logits.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_logprobs_entropy(shard, targets, chunk_size=5)
    n_tokens = targets.numel()
    big = [s for s in saved if s[1] > n_tokens]
    assert big == [(torch.bfloat16, logits.numel())], saved


@pytest.mark.parametrize("logits, targets, kwargs, message", [
    (torch.randn(2, 3, 8), torch.tensor([[0, 1, 8]] * 2), {}, "targets must be token ids in"),
    (torch.randn(2, 3, 8), torch.tensor([[0, -1, 2]] * 2), {}, "targets must be token ids in"),
    (torch.randn(2, 8), torch.tensor([1, 6]), {"valid_vocab_size": 6}, r"\[0, 6\)"),
    (torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long), {}, "targets shape"),
    (torch.randn(2, 3, 8), torch.zeros(3, 2, dtype=torch.long), {}, "targets shape"),
    (torch.randn(8), torch.tensor(0), {}, "rank >= 2"),
    (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long), {}, "floating-point"),
    (torch.randn(2, 8), torch.zeros(2), {}, "targets must be an integer tensor"),
    (torch.randn(2, 8), torch.zeros(2, dtype=torch.long), {"valid_vocab_size": 9}, "valid_vocab_size"),
    (torch.randn(2, 8), torch.zeros(2, dtype=torch.long), {"valid_vocab_size": 0}, "valid_vocab_size"),
    (torch.randn(2, 8), torch.zeros(2, dtype=torch.long), {"chunk_size": 0}, "chunk_size"),
])
def test_bad_input_raises_value_error(logits, targets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs_entropy(logits, targets, **kwargs)


# ---------------------------------------------------------------- TP = 2 and 4 on gloo

class _CollectiveLog:
    """Records every all_reduce (numel) and fails on any other collective, to check what crosses ranks."""

    def __init__(self, monkey_targets=("all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
                                       "reduce_scatter_tensor", "all_to_all", "send", "recv")):
        self.numels: list[int] = []
        self._original = dist.all_reduce
        self._others = {name: getattr(dist, name) for name in monkey_targets}

    def __enter__(self):
        def logged_all_reduce(tensor, *args, **kwargs):
            self.numels.append(tensor.numel())
            return self._original(tensor, *args, **kwargs)

        def forbidden(*args, **kwargs):
            raise AssertionError("vocab_parallel_logprobs_entropy used a collective other than all_reduce")

        dist.all_reduce = logged_all_reduce
        for name in self._others:
            setattr(dist, name, forbidden)
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original
        for name, fn in self._others.items():
            setattr(dist, name, fn)


def _tensor_parallel_worker(rank, world_size):
    torch.set_num_threads(1)
    # TP = 4 on the world group; TP = 2 on explicit subgroups {0, 1} and {2, 3} (all ranks create both).
    subgroups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    layouts = [(dist.group.WORLD, rank, 4), (subgroups[rank // 2], rank % 2, 2)]
    v_shard = 8
    for tp_group, tp_rank, tp_size in layouts:
        vocab = v_shard * tp_size
        for dtype in DTYPES:
            cases = [
                dict(seed=10, shape=(2, 7), chunk_size=3, valid_vocab=None, extreme=False),
                # Padding that leaves the last rank without a single real column at TP = 4.
                dict(seed=11, shape=(13,), chunk_size=5, valid_vocab=vocab - v_shard - 3, extreme=False),
                dict(seed=12, shape=(3, 3), chunk_size=None, valid_vocab=vocab - 2, extreme=True),
            ]
            for case in cases:
                logits, targets, g_lp, g_h = make_case(case["seed"], case["shape"], vocab, dtype,
                                                       case["valid_vocab"], case["extreme"])
                check_against_reference(logits, targets, g_lp, g_h, tp_rank, tp_size, tp_group,
                                        case["valid_vocab"], chunk_size=case["chunk_size"])

        # Communication: two all-reduces of per-token statistics in the forward, nothing in the backward.
        logits, targets, g_lp, g_h = make_case(13, (2, 5), vocab, torch.bfloat16)
        shard = logits[..., tp_rank * v_shard:(tp_rank + 1) * v_shard].clone().requires_grad_()
        with _CollectiveLog() as forward_log:
            logprobs, entropy = vocab_parallel_logprobs_entropy(shard, targets, tp_group=tp_group, chunk_size=3)
        with _CollectiveLog() as backward_log:
            (logprobs * g_lp + entropy * g_h).sum().backward()
        n_tokens = targets.numel()
        assert len(forward_log.numels) == 2 and max(forward_log.numels) <= 3 * n_tokens, forward_log.numels
        assert backward_log.numels == [], backward_log.numels
    return True


def test_tensor_parallel_tp4_and_tp2_subgroups_match_float64_reference():
    assert run_distributed(_tensor_parallel_worker, 4) == [True] * 4


def _megatron_worker(rank, world_size):
    torch.set_num_threads(1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    group = dist.new_group([0, 1])
    v_shard = 16
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, g_lp, _ = make_case(20, (5, 3), 2 * v_shard, dtype)
        shard = logits[..., rank * v_shard:(rank + 1) * v_shard]
        ours = shard.clone().requires_grad_()
        logprobs, _ = vocab_parallel_logprobs_entropy(ours, targets, tp_group=group, chunk_size=4)
        (logprobs * g_lp).sum().backward()
        # megatron-core overwrites an fp32 input in place, so it gets its own copy.
        theirs = shard.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(theirs.clone(), targets, tp_group=group)
        (-loss * g_lp).sum().backward()
        torch.testing.assert_close(logprobs, -loss.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), **GRAD_TOL[dtype])
    return True


def test_tp2_logprobs_match_megatron_core_vocab_parallel_cross_entropy():
    assert run_distributed(_megatron_worker, 2) == [True] * 2
