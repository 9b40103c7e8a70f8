"""Host memory per rank while a Megatron checkpoint (model + distributed optimizer) is saved and loaded, against the
rank's own optimizer shard, and what that means for the 7B recipe.

A world of TP x DP processes (gloo, CPU; default TP 2 x DP 2) builds a bf16 Qwen2-shaped model (random weights,
`--hidden` / `--layers` / `--vocab`) with the distributed optimizer, as `megatron-red train` does, gives it Adam
state, and saves it with `MegatronPolicy.save_checkpoint`, then loads it back with `load_checkpoint`. Each rank
measures its peak resident set size (VmHWM, reset through /proc/self/clear_refs before each call) above what it held
before the call. The rank's optimizer shard is what its distributed optimizer holds: fp32 master weights + two fp32
Adam moments of its DP slice of its TP shard (12 bytes per parameter). Everything in host memory here (CPU
tensors); on a GPU the tensors live on the device and host memory holds what dist_checkpointing copies out (save)
or reads in (load).

The projection to examples/red/qwen25_math_7b_8gpu.yaml (TP 2 x DP 4, 8 ranks per node) scales the measured peak
per shard byte: the shard of the 7B recipe's rank (12 bytes x its parameters / (TP x DP)) times the measured
ratio, where a ratio that grows with DP (a format that gathers the TP shard's whole optimizer state on every rank)
is scaled by DP 4 / the measured DP.

Run: `python tools/checkpoint_memory.py [--out FILE.md]` (CPU; about 1 minute and 5 GB of host memory at the
defaults). Not a GPU tool: on CPU the worker processes load tests/megatron_compat.py (megatron-core's unconditional
CUDA calls redirected to the CPU, as the tests do).
"""
from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import Report, command_line

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
RECIPE = ROOT / "examples" / "red" / "qwen25_math_7b_8gpu.yaml"
RECIPE_MODEL = ROOT / "examples" / "red" / "architectures" / "qwen2.5-math-7b"


def _peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _measure(fn) -> tuple[int, int]:
    """(resident bytes before fn(), peak resident bytes during it above that)."""
    import gc

    gc.collect()
    before = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    fn()
    return before, _peak_rss() - before


def optimizer_shard_bytes(optimizer) -> int:
    """Bytes of this rank's distributed-optimizer state: master weights and every state tensor (not `step`)."""
    total = 0
    for opt in optimizer.chained_optimizers:
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                total += p.numel() * p.element_size()
                total += sum(v.numel() * v.element_size() for k, v in opt.optimizer.state[p].items()
                             if torch.is_tensor(v) and k != "step")
    return total


def _worker(rank, world, port, args, directory, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        if not torch.cuda.is_available():
            sys.path.insert(0, str(ROOT / "tests"))
            import megatron_compat

            megatron_compat.install()
        from transformers import Qwen2Config

        from megatron_red.models.megatron.checkpoint import _allocate_optimizer_state
        from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
        from megatron_red.models.megatron.weights import unwrap_model
        from megatron_red.models.optim import OptimConfig

        config = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             num_key_value_heads=4, vocab_size=args.vocab,
                             max_position_embeddings=256, tie_word_embeddings=False)
        policy = MegatronPolicy(config, None, MegatronConfig(
            tensor_model_parallel_size=args.tp, dtype="bfloat16", use_distributed_optimizer=True,
            attention="sdpa"), OptimConfig())
        _allocate_optimizer_state(policy.optimizer)  # Adam's state, as after a first step (values do not matter)
        shard = optimizer_shard_bytes(policy.optimizer)
        model = sum(p.numel() * p.element_size() for p in unwrap_model(policy.model).parameters())
        path = os.path.join(directory, "ckpt")
        save = _measure(lambda: policy.save_checkpoint(path))
        dist.barrier()
        load = _measure(lambda: policy.load_checkpoint(path))
        queue.put((rank, True, {"shard": shard, "model": model, "save": save, "load": load}))
    except BaseException:  # noqa: BLE001 - the traceback goes to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(args) -> list[dict]:
    world = args.tp * args.dp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(dir=args.scratch) as directory:
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, directory, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=1800) for _ in range(world)]
        for p in procs:
            p.join(timeout=60)
    errors = [payload for _, ok, payload in results if not ok]
    if errors:
        raise SystemExit("a worker failed:\n" + "\n".join(errors))
    return [payload for _, _, payload in sorted(results, key=lambda r: r[0])]


def recipe_shard_bytes() -> tuple[int, int, int, int]:
    """(bytes of one rank's optimizer shard, bytes of its TP shard's bf16 weights, TP, DP) of the 7B recipe on its
    8 GPUs."""
    from transformers import AutoConfig

    from megatron_red.config import load_config
    from megatron_red.models.megatron.memory import stage_parameter_numel
    from megatron_red.models.megatron.model import HFArchitecture
    from megatron_red.trainer.build import parallel_layout

    config = load_config(RECIPE, [f"model.path={RECIPE_MODEL}"], planning=True)
    layout = parallel_layout(config.model, 8, torch.device("cuda"))
    arch = HFArchitecture.from_hf_config(AutoConfig.from_pretrained(RECIPE_MODEL, local_files_only=True))
    tp, pp, dp = (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                  layout.data_parallel_size)
    numel = stage_parameter_numel(arch, tp, pp, 0)
    return 12 * numel // dp, 2 * numel, tp, dp


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--scratch", default=None, help="where the checkpoint is written (default: the temp dir)")
    args = parser.parse_args()
    report = Report(args.out)
    ranks = measure(args)
    report(f"Checkpoint host memory per rank, TP {args.tp} x DP {args.dp}, bf16 Qwen2 shape hidden {args.hidden}, "
           f"{args.layers} layers, vocabulary {args.vocab}, distributed optimizer (CPU, gloo)")
    report()
    report("| rank | optimizer shard MiB | model shard MiB | RSS before save MiB | peak above it, save MiB (x shard) "
           "| peak above RSS before load, load MiB (x shard) |")
    report("|---|---|---|---|---|---|")
    for rank, r in enumerate(ranks):
        shard = r["shard"]
        report(f"| {rank} | {shard / MIB:.0f} | {r['model'] / MIB:.0f} | {r['save'][0] / MIB:.0f} | "
               f"{r['save'][1] / MIB:.0f} ({r['save'][1] / shard:.2f}) | {r['load'][1] / MIB:.0f} "
               f"({r['load'][1] / shard:.2f}) |")
    save_ratio = max(r["save"][1] / r["shard"] for r in ranks)
    load_ratio = max(r["load"][1] / r["shard"] for r in ranks)
    shard, weights, tp, dp = recipe_shard_bytes()
    gib = 2**30
    report()
    report(f"7B recipe (TP {tp} x DP {dp}, 8 ranks per node): optimizer shard {shard / gib:.1f} GiB per rank, bf16 "
           f"weights {weights / gib:.1f} GiB per TP shard. Projected peak host memory above the rank's baseline, "
           f"from the worst rank's measured ratio here:")
    for name, ratio in (("save", save_ratio), ("load", load_ratio)):
        scaled = ratio * dp / args.dp
        report(f"- {name}: {ratio:.2f} x shard = {ratio * shard / gib:.1f} GiB per rank, "
               f"{8 * ratio * shard / gib:.0f} GiB per node; if the ratio grows with DP (a gathered format): "
               f"{scaled:.2f} x shard = {scaled * shard / gib:.1f} GiB per rank, {8 * scaled * shard / gib:.0f} GiB "
               f"per node")
    staged = shard + weights / dp
    report(f"- on GPUs the state is device memory, and what a rank writes is staged in host memory at save: its "
           f"optimizer pieces and its share of the weights (fully parallel save), at most {staged / gib:.1f} GiB per "
           f"rank, {8 * staged / gib:.0f} GiB per node (a gathering format stages DP x its shard on every rank, "
           f"{(dp * shard + weights / dp) / gib:.1f} GiB per rank, {8 * (dp * shard + weights / dp) / gib:.0f} GiB "
           f"per node); at load a rank reads its own pieces only")
    report.write()


if __name__ == "__main__":
    main()
