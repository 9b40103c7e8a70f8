"""`rollout.offload_optimizer` on a GPU: the optimizer state's trip to host memory and back, through megatron_red's
`OptimizerOffload` (pinned host buffers allocated once, non-blocking copies, one synchronisation per direction)
against megatron-core's `offload_to_cpu` / `restore_from_cpu` (synchronous copies into new pageable memory).

One process builds a bf16 Qwen2-shaped policy with the distributed optimizer (`--hidden`, `--layers`, `--vocab`;
random weights) and gives it Adam state; each way is timed `--reps` times (the device synchronised around it): the
first offload of `OptimizerOffload` (which allocates and pins its buffers) separately from the later ones. The
report: GB moved each way, seconds and GB/s of each, and the host memory each keeps while training (the pinned
buffers stay for the whole run; megatron's pageable copies are freed when the state returns).

Run: `python tools/offload_bench.py [--out FILE.md]` (CUDA; megatron-core).
"""
from __future__ import annotations

import statistics

import torch

from harness import Report, command_line, require_cuda, timed


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    require_cuda("tools/offload_bench.py")
    from transformers import Qwen2Config

    from megatron_red.distributed import init_distributed
    from megatron_red.models.megatron.checkpoint import _allocate_optimizer_state
    from megatron_red.models.megatron.offload import OptimizerOffload
    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
    from megatron_red.models.optim import OptimConfig

    init_distributed(60.0, single_process=True)
    config = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 128, num_key_value_heads=4, vocab_size=args.vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    policy = MegatronPolicy(config, None, MegatronConfig(dtype="bfloat16", use_distributed_optimizer=True,
                                                         attention="sdpa"), OptimConfig())
    _allocate_optimizer_state(policy.optimizer)
    offload = OptimizerOffload(policy.optimizer, master_weights=True)
    moved = sum(t.numel() * t.element_size() for _, _, _, t in offload._slots())
    gb = moved / 1e9

    def rate(seconds: float) -> str:
        return f"{seconds:.2f} s ({gb / seconds:.1f} GB/s)"

    first = timed(offload.offload)[1]
    back = [timed(offload.onload)[1]]
    out = []
    for _ in range(args.reps):
        out.append(timed(offload.offload)[1])
        back.append(timed(offload.onload)[1])
    pinned = sum(b.numel() * b.element_size() for b in offload.host.values())
    mcore_out, mcore_back = [], []
    for _ in range(args.reps):
        mcore_out.append(timed(policy.optimizer.offload_to_cpu)[1])
        mcore_back.append(timed(policy.optimizer.restore_from_cpu)[1])
    report = Report(args.out)
    report(f"Optimizer offload: bf16 Qwen2 shape hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}; "
           f"{gb:.1f} GB of fp32 master weights and Adam moments each way; {torch.cuda.get_device_name()}; median of "
           f"{args.reps}")
    report()
    report("| path | to host | back to the GPU | host memory kept while training |")
    report("|---|---|---|---|")
    report(f"| OptimizerOffload, first offload (pins its buffers) | {rate(first)} | | |")
    report(f"| OptimizerOffload (pinned, non-blocking) | {rate(statistics.median(out))} | "
           f"{rate(statistics.median(back))} | {pinned / 1e9:.1f} GB pinned |")
    report(f"| megatron offload_to_cpu / restore_from_cpu (pageable, synchronous) | "
           f"{rate(statistics.median(mcore_out))} | {rate(statistics.median(mcore_back))} | 0 |")
    report.write()


if __name__ == "__main__":
    main()
