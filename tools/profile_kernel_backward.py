"""Where the fused LM head kernel's backward spends its time, and which backward settings are fastest, on one GPU.

At N x d x V (default 16384 x 1536 x 151936, bf16) times with CUDA events, after a warm-up, the median of a few
repetitions of: the forward; the backward's Triton dZ kernel alone over all vocabulary chunks (per tile and chunk
width); the grad_W = dZ^T h matmuls alone; the grad_h += dZ W matmuls alone, both through addmm with an fp32
output and through the bf16 mm + fp32 add fallback (and which one `_accumulate_matmul` takes on this torch);
then the whole backward and forward + backward for each `FusedKernelConfig` variant: dZ memory 64 / 128 / 160 MiB,
one buffer (sequential, the previous behaviour) or two (dZ of the next chunk on a side stream), and dZ tiles.
Prints markdown tables (ms, TFLOP/s of the FLOPs each row executes, extra memory beyond inputs and gradients) and
the fastest variant within the memory bound, as a FusedKernelConfig to make the default.

    python tools/profile_kernel_backward.py [--n 16384 --d 1536 --v 151936] [--bound-mib 256] [--out report.md]
"""
from __future__ import annotations

import math
import time

import torch

from harness import Report, command_line, median_ms, require_cuda, with_peak_memory

MIB = 2**20
REPS = 5  # CUDA-event timings per measurement, after a warm-up call (their median is reported)
CHUNK_BYTES = (64 * MIB, 128 * MIB, 160 * MIB)
# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) of the dZ kernel; None = its autotuned set.
TILES = [None, (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4)]


def tile_name(tile) -> str:
    return "autotuned" if tile is None else f"{tile[0]}x{tile[1]}x{tile[2]} w{tile[3]} s{tile[4]}"


def tile_config(tile) -> dict:
    if tile is None:
        return {}
    return {"grad_blocks": tile[:3], "grad_num_warps": tile[3], "grad_num_stages": tile[4]}


def main(argv=None) -> int:
    parser = command_line(__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--bound-mib", type=float, default=256.0, help="extra-memory bound for the best config")
    args = parser.parse_args(argv)
    require_cuda("profile_kernel_backward.py")

    import triton

    from megatron_red.kernels import FusedKernelConfig, fused_linear_logprobs_entropy
    from megatron_red.kernels import fused_linear_logprobs as flp
    from megatron_red.kernels.triton_kernels import grad_logits_best_config, launch_grad_logits

    t_start = time.time()
    emit = Report(args.out)

    n, d, v = args.n, args.d, args.v
    nd_v = n * d * v
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=g) * (2.0 / math.sqrt(d))).to(torch.bfloat16)
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    a = torch.randn(n, device="cuda", generator=g)
    b = torch.randn(n, device="cuda", generator=g)
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()

    def tflops(flops, ms):
        return f"{flops / (ms * 1e-3) / 1e12:.0f}"

    emit(f"# Fused LM head backward profile on {torch.cuda.get_device_name()}")
    emit(f"torch {torch.__version__}, triton {triton.__version__}; N x d x V = {n} x {d} x {v}, bf16; "
         f"TFLOP/s count the FLOPs each row executes (2 N d V per matmul-sized pass)")
    emit()

    # ---- forward, and the saved tensors the backward's dZ kernel reads
    def forward(config=None):
        return fused_linear_logprobs_entropy(hidden, weight, targets, config=config)

    with torch.no_grad():
        fwd_ms = median_ms(forward, reps=REPS)
    logprobs, entropy = forward()
    node = logprobs.grad_fn  # a view of the fused autograd node's output
    while "_FusedLinearLogprobsEntropy" not in type(node).__name__:
        node = node.next_functions[0][0]
    lse2, saved_entropy = node.saved_tensors[3:5]
    coefs = flp._grad_coefficients(a, b, saved_entropy, 1.0)
    del logprobs, entropy

    emit("## Pieces, each over all vocabulary chunks")
    emit("| piece | chunk columns | variant | ms | TFLOP/s |")
    emit("|---|---|---|---|---|")
    emit(f"| forward (stats + combine) | - | autotuned | {fwd_ms:.2f} | {tflops(2 * nd_v, fwd_ms)} |")
    widths = sorted({flp._grad_chunk_cols(n, v, 2, FusedKernelConfig(grad_chunk_bytes=cb, grad_buffers=nb))
                     for cb in CHUNK_BYTES for nb in (1, 2)})
    buffer = torch.empty(n * max(widths), dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for width in widths:
            starts = range(0, v, width)

            def dz_all(tile, width=width, starts=starts):
                blocks, warps, stages = (None, 8, 3) if tile is None else (tile[:3], tile[3], tile[4])
                for start in starts:
                    w_ = min(width, v - start)
                    launch_grad_logits(hidden, weight, targets, lse2, *coefs, buffer[: n * w_].view(n, w_), start,
                                       0, flp._LOG2E, 8, blocks, warps, stages)

            for tile in TILES:
                ms = median_ms(lambda tile=tile: dz_all(tile), reps=REPS)
                label = tile_name(tile)
                if tile is None:
                    label += f" ({grad_logits_best_config()})"
                emit(f"| dZ kernel | {width} | {label} | {ms:.2f} | {tflops(2 * nd_v, ms)} |")

        # Flat, so that each width's [N, width] view is contiguous as the backward's buffer is.
        dz = torch.randn(n * max(widths), device="cuda", dtype=torch.bfloat16, generator=g) * 1e-3
        grad_w = torch.empty_like(weight)
        acc = torch.zeros(n, d, dtype=torch.float32, device="cuda")
        flp._ADDMM_FP32_OUT = True
        flp._accumulate_matmul(acc, dz[: n * 256].view(n, 256), weight[:256])
        torch.cuda.synchronize()
        path = "addmm(out_dtype=fp32)" if flp._ADDMM_FP32_OUT else "fallback acc.add_(mm) (addmm out_dtype failed)"
        for width in widths:
            chunks = [(s, min(width, v - s)) for s in range(0, v, width)]
            views = [dz[: n * w_].view(n, w_) for _, w_ in chunks]

            def grad_w_all():
                for (s, w_), dzw in zip(chunks, views):
                    torch.mm(dzw.t(), hidden, out=grad_w[s:s + w_])

            def grad_h_addmm():
                for (s, w_), dzw in zip(chunks, views):
                    torch.addmm(acc, dzw, weight[s:s + w_], out_dtype=torch.float32, out=acc)

            def grad_h_fallback():
                for (s, w_), dzw in zip(chunks, views):
                    acc.add_(torch.mm(dzw, weight[s:s + w_]))

            ms = median_ms(grad_w_all, reps=REPS)
            emit(f"| grad_W = dZ^T h (mm out=) | {width} | cuBLAS | {ms:.2f} | {tflops(2 * nd_v, ms)} |")
            if flp._ADDMM_FP32_OUT:
                ms = median_ms(grad_h_addmm, reps=REPS)
                emit(f"| grad_h += dZ W | {width} | addmm out_dtype=fp32 | {ms:.2f} | {tflops(2 * nd_v, ms)} |")
            ms = median_ms(grad_h_fallback, reps=REPS)
            emit(f"| grad_h += dZ W | {width} | fallback add_(mm) | {ms:.2f} | {tflops(2 * nd_v, ms)} |")
        emit(f"\n_accumulate_matmul path on this torch: **{path}**")
        del buffer, dz, views, grad_w, acc
    torch.cuda.empty_cache()
    emit()

    # ---- whole backward per config
    variants = [(f"{cb // MIB} MiB, {nb} buffer{'s' if nb > 1 else ''}, autotuned",
                 FusedKernelConfig(grad_chunk_bytes=cb, grad_buffers=nb)) for nb in (1, 2) for cb in CHUNK_BYTES]
    for tile in TILES[1:]:
        for nb in (1, 2):
            variants.append((f"128 MiB, {nb} buffer{'s' if nb > 1 else ''}, {tile_name(tile)}",
                             FusedKernelConfig(grad_chunk_bytes=128 * MIB, grad_buffers=nb, **tile_config(tile))))
    for rows in (4, 16):
        variants.append((f"128 MiB, 2 buffers, autotuned, group rows {rows}",
                         FusedKernelConfig(grad_buffers=2, grad_group_rows=rows)))

    emit("## Whole backward per FusedKernelConfig (1 buffer = the previous sequential schedule)")
    emit("| variant | chunk columns | bwd ms | bwd TFLOP/s | fwd+bwd ms | beyond inputs+grads MiB |")
    emit("|---|---|---|---|---|---|")
    results = []
    for name, config in variants:
        def fwd_bwd(config=config):
            lp, ent = forward(config)
            return torch.autograd.grad((lp * a).sum() + (ent * b).sum(), [hidden, weight])

        fwd_bwd()
        grads, peak, base = with_peak_memory(fwd_bwd)
        extra_mib = (peak - base - grad_bytes) / MIB
        del grads
        lp, ent = forward(config)
        loss = (lp * a).sum() + (ent * b).sum()
        bwd_ms = median_ms(lambda loss=loss: torch.autograd.grad(loss, [hidden, weight], retain_graph=True), reps=REPS)
        del lp, ent, loss
        total_ms = median_ms(fwd_bwd, reps=REPS)
        width = flp._grad_chunk_cols(n, v, 2, config)
        results.append((total_ms, extra_mib, name, config))
        emit(f"| {name} | {width} | {bwd_ms:.1f} | {tflops(6 * nd_v, bwd_ms)} | {total_ms:.1f} | {extra_mib:.0f} |")
    emit()

    within = [r for r in results if r[1] <= args.bound_mib]
    if within:
        total_ms, extra_mib, name, config = min(within, key=lambda r: r[0])
        emit(f"**best within {args.bound_mib:.0f} MiB: {name}: fwd+bwd {total_ms:.1f} ms, {extra_mib:.0f} MiB**")
        emit(f"`{config}`")
    else:
        emit(f"no variant stayed within {args.bound_mib:.0f} MiB")
    emit(f"\ntotal runtime {time.time() - t_start:.1f} s")
    emit.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
