"""Benchmark of the fused LM head + log-prob + entropy kernel against the alternatives on one GPU.

First checks correctness against float64 (bf16 and fp32 inputs, values and both gradients; for bf16 the error of
merely rounding the float64 gradient to bf16 is printed beside ours), then prints a markdown table of
forward + backward and forward-only time, TFLOP/s (6 N d V useful FLOPs over the fwd+bwd time) and extra peak
memory for: ours (the default config, and with the sequential one-buffer backward), naive (bf16 logits -> fp32
log_softmax + entropy), chunked (2048 rows + checkpoint), torch.compile(naive), and verl / Liger / Cut
Cross-Entropy when importable; then the memory sweep of ours over V.
Loss = sum(logprob * a) + sum(entropy * b) with random a, b (cross-entropy-only libraries: their per-token loss).

Default workload: N x d x V = 16384 x 1536 x 151936 (Qwen2.5-1.5B's LM head), 8192 x 3584 x 152064 (7B),
4096 x 5120 x 152064 (32B), then ours at N = 16384, d = 1536 for V = 32k..256k; about 1.7 minutes on an H200 with
torch.compile (which `--compile-budget-s` drops from later shapes when it compiles slowly).

    python tools/bench_kernels.py [--quick] [--out results.md] [--no-compile]
"""
from __future__ import annotations

import math
import time

import torch
from torch.utils.checkpoint import checkpoint

from harness import Report, command_line, median_ms, require_cuda, with_peak_memory

SHAPES = [(16384, 1536, 151936), (8192, 3584, 152064), (4096, 5120, 152064)]
QUICK_SHAPES = [(2048, 1024, 32768)]
SWEEP_VOCAB = [32768, 65536, 131072, 262144]
SWEEP_N, SWEEP_D = 16384, 1536


# ----------------------------------------------------------------------------------------------- implementations
def naive(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    log_p = torch.log_softmax(logits, dim=-1)
    logprobs = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy


def chunked(hidden, weight, targets, rows=2048):
    outs = [checkpoint(naive, hidden[i:i + rows], weight, targets[i:i + rows], use_reentrant=False)
            for i in range(0, hidden.shape[0], rows)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def ours(hidden, weight, targets):
    from megatron_red.kernels import fused_linear_logprobs_entropy
    return fused_linear_logprobs_entropy(hidden, weight, targets)


def ours_sequential(hidden, weight, targets):
    """Ours with one dZ buffer: the backward's dZ kernels and matmuls in sequence on one stream (no overlap)."""
    from megatron_red.kernels import FusedKernelConfig, fused_linear_logprobs_entropy
    return fused_linear_logprobs_entropy(hidden, weight, targets, config=FusedKernelConfig(grad_buffers=1))


def optional_impls() -> dict:
    """Third-party fused kernels that are importable here: name -> (fn(h, w, y) -> (per-token a, b or None), entropy)."""
    impls = {}
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as verl_lce

        impls["verl linear_cross_entropy"] = (lambda h, w, y: verl_lce(h, w, y), True)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        pass
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        impls["Liger fused linear CE"] = (lambda h, w, y: (liger(w, h, y), None), False)
    except Exception:  # noqa: BLE001
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["Cut Cross-Entropy"] = (lambda h, w, y: (cce(h, w, y, reduction="none"), None), False)
    except Exception:  # noqa: BLE001
        pass
    return impls


# ----------------------------------------------------------------------------------------------------- measuring
def make_inputs(n, d, v, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, d, device="cuda", dtype=dtype, generator=g)
    # Logits of std ~2, a realistic spread for an LM head.
    weight = (torch.randn(v, d, device="cuda", generator=g) * (2.0 / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    a = torch.randn(n, device="cuda", generator=g)
    b = torch.randn(n, device="cuda", generator=g)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, a, b


def loss_of(out, a, b):
    first, entropy = out
    if first.dim() == 0:
        loss = first
    else:
        loss = (first * a).sum()
    return loss if entropy is None else loss + (entropy * b).sum()


def bench_row(name, fn, n, d, v, entropy_flag):
    hidden, weight, targets, a, b = make_inputs(n, d, v)

    def fwd_bwd():
        loss = loss_of(fn(hidden, weight, targets), a, b)
        return torch.autograd.grad(loss, [hidden, weight])

    def fwd():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    row = {"name": name, "shape": f"{n} x {d} x {v}", "entropy": entropy_flag}
    try:
        fwd_bwd()
        grads, peak, base = with_peak_memory(fwd_bwd)
        extra = peak - base
        del grads
        grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
        row.update(ms=median_ms(fwd_bwd), fwd_ms=median_ms(fwd), extra_gib=extra / 2**30,
                   beyond_grads_mib=(extra - grad_bytes) / 2**20)
        row["tflops"] = 6 * n * d * v / (row["ms"] * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the table
        row["error"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    del hidden, weight
    torch.cuda.empty_cache()
    return row


def format_row(row) -> str:
    if "error" in row:
        return f"| {row['name']} | {row['shape']} | {row['error']} | | | | | {row['entropy']} |"
    return (f"| {row['name']} | {row['shape']} | {row['ms']:.1f} | {row['fwd_ms']:.1f} | {row['tflops']:.0f} | "
            f"{row['extra_gib']:.2f} | {row['beyond_grads_mib']:.0f} | {row['entropy']} |")


def matmul_tflops() -> float:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: x @ y, budget_ms=200)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------------- correctness
def check_correctness(n, d, v, dtype, temperature=0.8, valid_vocab_size=None) -> dict:
    from megatron_red.kernels import fused_linear_logprobs_entropy, reference_linear_logprobs_entropy

    hidden, weight, targets, a, b = make_inputs(n, d, v, dtype=dtype, seed=1)
    if valid_vocab_size is not None:
        targets = targets % valid_vocab_size
    lp, ent = fused_linear_logprobs_entropy(hidden, weight, targets, temperature=temperature,
                                            valid_vocab_size=valid_vocab_size)
    gh, gw = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), [hidden, weight])
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    rlp, rent = reference_linear_logprobs_entropy(h64, w64, targets, temperature, valid_vocab_size, torch.float64)
    rgh, rgw = torch.autograd.grad((rlp * a.double()).sum() + (rent * b.double()).sum(), [h64, w64])

    def rel(x, ref):
        return float((x.double() - ref).norm() / ref.norm())

    out = {"logprobs": rel(lp, rlp), "entropy": rel(ent, rent), "grad_hidden": rel(gh, rgh),
           "grad_weight": rel(gw, rgw)}
    if dtype != torch.float32:
        out["floor_grad_hidden"] = rel(rgh.to(dtype), rgh)
        out["floor_grad_weight"] = rel(rgw.to(dtype), rgw)
    return out


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = command_line(__doc__)
    parser.add_argument("--quick", action="store_true", help="one small shape only (a smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(naive)")
    parser.add_argument("--compile-budget-s", type=float, default=90.0,
                        help="skip torch.compile on later shapes once its compilation took longer than this")
    args = parser.parse_args(argv)
    require_cuda("bench_kernels.py")

    import triton

    t_start = time.time()
    emit = Report(args.out)

    card = torch.cuda.get_device_name()
    rate = matmul_tflops()
    emit(f"# Fused LM head + log-prob + entropy on {card}")
    emit(f"torch {torch.__version__}, triton {triton.__version__}; bf16 matmul {rate:.0f} TFLOP/s (8192^3)")
    emit()

    emit("## Correctness against float64 (relative error, L2 norm)")
    emit("| inputs | N x d x V | logprobs | entropy | grad hidden | grad weight | "
         "bf16-rounding floor (grad hidden / weight) |")
    emit("|---|---|---|---|---|---|---|")
    checks = [("bf16, T=0.8, padded vocab", 2048, 1024, 32000, torch.bfloat16, 31900),
              ("fp32, T=0.8", 1024, 512, 16384, torch.float32, None)]
    if args.quick:
        checks = [(name, n // 2, d, v // 2, dt, vv and vv // 2) for name, n, d, v, dt, vv in checks]
    for name, n, d, v, dtype, valid in checks:
        e = check_correctness(n, d, v, dtype, valid_vocab_size=valid)
        floor = (f"{e['floor_grad_hidden']:.2e} / {e['floor_grad_weight']:.2e}" if "floor_grad_hidden" in e
                 else "-")
        emit(f"| {name} | {n} x {d} x {v} | {e['logprobs']:.2e} | {e['entropy']:.2e} | {e['grad_hidden']:.2e} | "
             f"{e['grad_weight']:.2e} | {floor} |")
        torch.cuda.empty_cache()
    emit()

    impls = [("ours (megatron_red.kernels)", ours, "yes"),
             ("ours, 1 dZ buffer (sequential backward)", ours_sequential, "yes"), ("naive", naive, "yes"),
             ("chunked 2048 + checkpoint", chunked, "yes")]
    compiled = None if args.no_compile else torch.compile(naive, dynamic=False)
    extra = optional_impls()
    emit("## fwd+bwd, bf16 (TFLOP/s counts 6 N d V; extra peak = peak allocated minus inputs, incl. gradients)")
    emit("| implementation | N x d x V | fwd+bwd ms | fwd ms | TFLOP/s | extra peak GiB | beyond grads MiB | entropy |")
    emit("|---|---|---|---|---|---|---|---|")
    for n, d, v in (QUICK_SHAPES if args.quick else SHAPES):
        floor = 6 * n * d * v / (rate * 1e12) * 1e3
        for name, fn, ent in impls:
            emit(format_row(bench_row(name, fn, n, d, v, ent)))
        if compiled is not None:
            t0 = time.time()
            emit(format_row(bench_row("torch.compile(naive)", compiled, n, d, v, "yes")))
            if time.time() - t0 > args.compile_budget_s:
                compiled = None  # compilation is too slow for this budget: skip it on the remaining shapes
        for name, (fn, has_entropy) in extra.items():
            emit(format_row(bench_row(name, fn, n, d, v, "yes" if has_entropy else "no (CE only)")))
        emit(f"| matmul floor 6NdV / 8NdV | {n} x {d} x {v} | {floor:.1f} / {floor * 4 / 3:.1f} | | {rate:.0f} | | | |")
    emit()

    if not args.quick:
        emit(f"## Memory sweep of ours, N = {SWEEP_N}, d = {SWEEP_D}, bf16")
        emit("| implementation | N x d x V | fwd+bwd ms | fwd ms | TFLOP/s | extra peak GiB | beyond grads MiB | "
             "entropy |")
        emit("|---|---|---|---|---|---|---|---|")
        for v in SWEEP_VOCAB:
            emit(format_row(bench_row("ours", ours, SWEEP_N, SWEEP_D, v, "yes")))
        emit()

    emit(f"total runtime {time.time() - t_start:.1f} s")
    emit.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
