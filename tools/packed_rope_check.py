"""Packed micro-batches through megatron's rotary embedding on a GPU: packed rows must give the padded rows'
log-probs (each row's positions restart at 0), and the unfused packed RoPE's host syncs are counted.

megatron-core 0.19 applies RoPE to a packed (THD) micro-batch with `.tolist()` / `.item()` on cu_seqlens when it is
not fused (`_apply_rotary_pos_emb_thd`): device syncs in every layer, for queries and keys. Transformer Engine's
fused RoPE (`model.attention=te`, which turns megatron's `apply_rope_fusion` on) has none. For each spec this
installation has (sdpa always; te with Transformer Engine), one process builds a bf16 Qwen2-shaped model with random
weights (`--hidden`, `--layers`, `--vocab`) and runs forward-only log-probs of `--rows` rows of random lengths up to
`--max-len` tokens, padded (`--micro-batch` rows per micro-batch) and packed (`--pack-tokens` per micro-batch). The
report: the largest |log-prob difference| packed vs padded on the trained tokens (bf16; the check fails above
`--atol`), the device syncs of each forward (torch.cuda.set_sync_debug_mode("warn"): each synchronising call warns)
and the packed forward's extra syncs per layer and micro-batch, and the median time of each forward.

Run: `python tools/packed_rope_check.py [--out FILE.md]` (CUDA; megatron-core; Transformer Engine optional). Exit
code 0 = every spec within `--atol`, 1 = not.
"""
from __future__ import annotations

import statistics
import warnings

import torch

from harness import Report, command_line, require_cuda, timed


def count_syncs(fn) -> tuple[object, int]:
    """(fn(), the synchronising CUDA calls it made); 0 calls counted off CUDA."""
    if not torch.cuda.is_available():
        return fn(), 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in caught)


def rows_batch(args, seed: int = 0):
    """`args.rows` rows of random lengths (a 16-token prompt, then trained tokens), right-padded."""
    from megatron_red.batch import SequenceBatch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(args.max_len // 4, args.max_len + 1, (args.rows,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(0, args.vocab, (args.rows, width), generator=g)
    attention = (torch.arange(width)[None] < lengths[:, None]).long()
    loss_mask = attention[:, 1:].clone()
    loss_mask[:, :15] = 0
    return SequenceBatch(ids * attention, attention, loss_mask.float())


def measure(attention: str, args, batch) -> dict:
    """Padded and packed forward-only log-probs of `batch` through a fresh one-process policy with `attention`."""
    from megatron.core import parallel_state as ps
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
    from megatron_red.models.optim import OptimConfig

    config = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 128, num_key_value_heads=2, vocab_size=args.vocab,
                         max_position_embeddings=2 * args.max_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    weights = Qwen2ForCausalLM(config).state_dict()
    policy = MegatronPolicy(config, weights, MegatronConfig(dtype="bfloat16", attention=attention,
                                                            max_tokens_per_micro_batch=args.pack_tokens),
                            OptimConfig())
    del weights
    out = {"attention": attention, "rope_fusion": policy.config.rope_fusion}
    for name, budget in (("padded", 0), ("packed", args.pack_tokens)):
        policy.config.max_tokens_per_micro_batch = budget

        def forward():
            return policy.get_inference_log_probs(batch, args.micro_batch)

        forward()  # warm-up: kernels, allocator
        (logprobs, _), syncs = count_syncs(forward)
        seconds = statistics.median(timed(forward)[1] for _ in range(3))
        out[name] = {"logprobs": logprobs.float().cpu(), "syncs": syncs, "ms": 1e3 * seconds}
    from megatron_red.parallel.packing import micro_batch_rows

    out["packs"] = len(micro_batch_rows(batch, args.micro_batch, args.pack_tokens))
    mask = batch.loss_mask.bool()
    out["max_diff"] = float((out["packed"]["logprobs"] - out["padded"]["logprobs"])[mask].abs().max())
    del policy
    ps.destroy_model_parallel()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--pack-tokens", type=int, default=8192)
    parser.add_argument("--atol", type=float, default=0.1)
    args = parser.parse_args()
    require_cuda("tools/packed_rope_check.py")
    from megatron_red.distributed import init_distributed
    from megatron_red.models.megatron.layout import transformer_engine_available

    init_distributed(60.0, single_process=True)
    report = Report(args.out)
    batch = rows_batch(args)
    specs = ["sdpa"] + (["te"] if transformer_engine_available() else [])
    report(f"Packed RoPE: {args.rows} rows of {args.max_len // 4}-{args.max_len} tokens, bf16 Qwen2 shape hidden "
           f"{args.hidden}, {args.layers} layers; padded {args.micro_batch} rows / packed {args.pack_tokens} tokens "
           f"per micro-batch; {torch.cuda.get_device_name()}"
           + ("" if "te" in specs else "; Transformer Engine not installed: te not measured"))
    report()
    report("| attention | RoPE fusion | max abs diff packed vs padded | syncs padded | syncs packed | extra syncs per "
           "layer and packed micro-batch | ms padded | ms packed |")
    report("|---|---|---|---|---|---|---|---|")
    ok = True
    for attention in specs:
        r = measure(attention, args, batch)
        extra = (r["packed"]["syncs"] - r["padded"]["syncs"]) / (args.layers * r["packs"])
        ok = ok and r["max_diff"] <= args.atol
        report(f"| {attention} | {r['rope_fusion']} | {r['max_diff']:.3g} | {r['padded']['syncs']} | "
               f"{r['packed']['syncs']} | {extra:.1f} | {r['padded']['ms']:.1f} | {r['packed']['ms']:.1f} |")
    report()
    report(f"{'PASSED' if ok else 'FAILED'}: packed log-probs within {args.atol:g} of the padded ones")
    report.write()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
