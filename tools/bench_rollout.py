"""Benchmark rollouts on one GPU: HF `generate`, `LocalEngine`, the megatron engine (megatron-core's dynamic
engine on a `GPTModel`, `megatron_red.rollout.megatron`) and the vLLM engine (`megatron_red.rollout.vllm_engine`,
where vLLM is installed), side by side on the same weights; and one training step (`HFPolicy`, fused LM-head
kernel on vs off). vLLM rows also report the refit time (the engine's weights streamed in from the model, as after
every optimiser step; the median of `--refits`) and the share of the call its entropy recorder took (the
full-vocabulary entropy behind H_rl, which vLLM does not compute; the other engines get it from logits they hold).

Default shapes are the anchors of docs/targets.md: a randomly initialised Qwen2.5-1.5B-shaped model in bf16;
128-token prompts, each sampled `--samples-per-prompt` times (RED's G), at temperature 1; rows x new tokens
64 x 512 and 512 x 1024 (`--shapes`); a training step on 4 x 4096 tokens. Every row decodes all its new tokens
(EOS is disabled) so all engines do the same work. Each rollout row reports generated tokens/s and the peak of
allocated GPU memory during the timed call (the HF and megatron copies of the weights, ~3 GiB each, are both
resident); megatron rows also report the KV buffer, the prompt tokens prefix sharing skipped, and the memory
`suspend()` returned to the allocator. `--quick` shrinks everything to a small model (and `--device cpu --quick`
is a smoke test of the local engine; the megatron engine needs CUDA). `--model main-job` is the built-in task's
student (4 layers x 128, vocabulary 256, float32 on CPU) at the main job's rollout shape, 8 prompts x 7 samples x
192 new tokens, and a wider one, 72 x 7 x 192.

Default workload: HF generate (first shape only), LocalEngine and the megatron engine each eager and with CUDA
graphs, at 64 x 512 and 512 x 1024, then the training step. `--engines` picks variants: `local` / `megatron` (eager
and graphed) or `local-eager`, `local-graph`, `megatron-eager`, `megatron-graph`.

    python tools/bench_rollout.py                      # H100 / H200, about 3-4 minutes
    python tools/bench_rollout.py --skip-hf-generate --skip-train --engines local-graph,megatron-graph
                                                       # tools/gpu_checks.sh's megatron_rollout step, ~1.3 minutes
    python tools/bench_rollout.py --device cpu --quick # smoke test
    python tools/bench_rollout.py --device cpu --model main-job --engines local,vllm --skip-train
                                                       # local vs vLLM on the main job's student (2 CPU cores)
"""
from __future__ import annotations

import gc
import traceback

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from harness import command_line, require_cuda, timed
from megatron_red.batch import SequenceBatch
from megatron_red.models import HFPolicy, OptimConfig
from megatron_red.rollout import LocalEngine, SamplingParams


def model_config(name: str) -> Qwen2Config:
    if name == "main-job":  # trainer/build.py's tiny_qwen2_config at the embedded default's model.* values
        return Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           rope_theta=10000.0, tie_word_embeddings=True)
    if name == "quick":
        return Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)


def gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def peak_note(device) -> str:
    return f"peak {gib(torch.cuda.max_memory_allocated(device))}" if device.type == "cuda" else ""


def bench_rollout(args, config, device, dtype, rows: list) -> None:
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    sharded = build_megatron_model(config, model, dtype) if graph_modes(args, "megatron", device) else None
    for batch, new in args.shapes:
        args.batch, args.new_tokens = batch, new
        bench_shape(args, config, model, sharded, device, rows)
        args.skip_hf_generate = True  # the slow baseline once, at the first shape
    del model, sharded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_megatron_model(config, model, dtype):
    """The same weights as a megatron-core `GPTModel` (one process group of one rank), with megatron's CUDA-graph
    managers when on CUDA (off until an engine switches them on)."""
    import os

    import torch.distributed as dist

    from megatron_red.models.megatron import MegatronConfig, ShardedModel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    names = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
    return ShardedModel.from_hf(config, model.state_dict(), MegatronConfig(
        dtype=names[dtype], inference_cuda_graphs=torch.cuda.is_available()))


class _Ids:
    eos_token_id, pad_token_id = -1, 0  # EOS disabled: every row decodes all its new tokens


def shape_of(args) -> str:
    """A rollout row's work: rows x new tokens."""
    return f"{args.batch}x{args.new_tokens}"


def graph_modes(args, engine: str, device) -> list[bool]:
    """The CUDA-graph settings (False = eager) that `--engines` asks of `engine` (graphs only on CUDA)."""
    modes = []
    for cuda_graph, mode in ((False, "eager"), (True, "graph")):
        if (engine in args.engines or f"{engine}-{mode}" in args.engines) and (device.type == "cuda" or not cuda_graph):
            modes.append(cuda_graph)
    return modes


def bench_variants(args, engine: str, label: str, row, device, rows: list) -> None:
    """Each CUDA-graph setting of `engine` that `--engines` asks for: `row(name, cuda_graph)` gives its table row; a
    failed variant is a row of the table too, and the others still run."""
    for cuda_graph in graph_modes(args, engine, device):
        name = label + (" + CUDA graphs" if cuda_graph else " (eager)")
        print(f"{name}, {args.batch} rows x {args.new_tokens} new tokens ...", flush=True)
        try:
            rows.append(row(name, cuda_graph))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append((shape_of(args), name, float("nan"), float("nan"), f"failed: {type(e).__name__}: {e}"[:160]))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def megatron_row(args, sharded, prompts, device, name, cuda_graph, params):
    from megatron_red.config import RolloutConfig
    from megatron_red.trainer.build import build_engine

    n = args.samples_per_prompt
    rollout = RolloutConfig(max_batch_size=args.batch, kv_block_size=args.kv_block_size, cuda_graph=cuda_graph)
    engine = build_engine("megatron", sharded, _Ids(), rollout, max_sequence_length=args.prompt_len + args.new_tokens)
    engine.generate(prompts[:1], n, SamplingParams(max_new_tokens=4, seed=0))  # warm-up: build, capture
    before = engine.prefix_cache_stats()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out, seconds = timed(lambda: engine.generate(prompts, n, params), device)
    assert all(len(c.token_ids) == args.new_tokens for cs in out for c in cs)
    after = engine.prefix_cache_stats()
    skipped = after["skipped"] - before["skipped"]
    total = skipped + after["computed"] - before["computed"]
    notes = [peak_note(device), f"KV {engine.kv_buffer_gb:.1f} GiB", f"prefix: {skipped}/{total} prompt tokens skipped"]
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
        engine.suspend()
        gc.collect()
        notes.append(f"suspend() freed {gib(held - torch.cuda.memory_allocated(device))}")
    return (shape_of(args), name, seconds, args.batch * args.new_tokens / seconds, "; ".join(filter(None, notes)))


def bench_shape(args, config, model, sharded, device, rows: list) -> None:
    if args.batch % args.samples_per_prompt:
        raise SystemExit(f"rows {args.batch} must be a multiple of --samples-per-prompt {args.samples_per_prompt}")
    g = torch.Generator().manual_seed(0)
    unique = torch.randint(1, config.vocab_size, (args.batch // args.samples_per_prompt, args.prompt_len),
                           generator=g)
    prompts = unique.repeat_interleave(args.samples_per_prompt, dim=0)  # HF generate: the same rows
    new_tokens = args.batch * args.new_tokens
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=0)

    if not args.skip_hf_generate:
        print(f"HF generate: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens ...",
              flush=True)
        ids = prompts.to(device)
        with torch.no_grad():
            out, seconds = timed(lambda: model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0), device)
        assert out.shape[1] == args.prompt_len + args.new_tokens
        rows.append((shape_of(args), "HF generate", seconds, new_tokens / seconds, ""))

    prompt_lists, n = unique.tolist(), args.samples_per_prompt
    for cuda_graph in graph_modes(args, "local", device):
        engine = LocalEngine(model, eos_token_id=-1, pad_token_id=0, max_batch_size=args.batch,
                             cuda_graph=cuda_graph)
        name = "LocalEngine" + (" + CUDA graph" if cuda_graph else " (eager)")
        print(f"{name}, {args.batch} rows x {args.new_tokens} new tokens ...", flush=True)
        engine.generate(prompt_lists[:2], 1, SamplingParams(max_new_tokens=4, seed=0))  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out, seconds = timed(lambda: engine.generate(prompt_lists, n, params), device)
        assert all(len(c.token_ids) == args.new_tokens for cs in out for c in cs)
        rows.append((shape_of(args), name, seconds, new_tokens / seconds, peak_note(device)))
        del engine, out
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if sharded is not None:
        bench_variants(args, "megatron", "megatron engine", lambda name, cuda_graph: megatron_row(
            args, sharded, prompt_lists, device, name, cuda_graph, params), device, rows)
    bench_variants(args, "vllm", "vLLM engine", lambda name, cuda_graph: vllm_row(
        args, model, prompt_lists, device, name, cuda_graph, params), device, rows)


class _ModuleWeights:
    """An HF module as the vLLM engine's weight source (what a policy's `named_hf_weights` gives)."""

    def __init__(self, model):
        self.model = model

    def named_hf_weights(self):
        return ((name, p.detach()) for name, p in self.model.named_parameters())


def vllm_row(args, model, prompts, device, name, cuda_graph, params):
    from megatron_red.rollout.vllm_engine import VLLMEngine

    n = args.samples_per_prompt
    engine = VLLMEngine(model.config, weights=_ModuleWeights(model), eos_token_id=_Ids.eos_token_id,
                        dtype=next(model.parameters()).dtype, max_batch_size=args.batch,
                        max_sequence_length=args.prompt_len + args.new_tokens, cuda_graph=cuda_graph,
                        release_kv_cache=False)
    try:
        engine.generate(prompts[:1], n, SamplingParams(max_new_tokens=4, seed=0))  # warm-up: first refit, graphs
        for _ in range(args.refits):
            engine.sync_weights()
        refit = sorted(engine.refit_seconds[1:])[args.refits // 2]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        recorder = engine.recorder_seconds
        out, seconds = timed(lambda: engine.generate(prompts, n, params), device)
        assert all(len(c.token_ids) == args.new_tokens for cs in out for c in cs)
        h_rl = (engine.recorder_seconds - recorder) / seconds
        notes = [peak_note(device), f"KV {engine.kv_buffer_gb:.2f} GiB", f"refit {refit * 1e3:.1f} ms",
                 f"H_rl recorder {100 * h_rl:.1f}% of the call"]
    finally:
        engine.close()
    return (shape_of(args), name, seconds, args.batch * args.new_tokens / seconds, "; ".join(filter(None, notes)))


def bench_train(args, config, device, rows: list) -> None:
    g = torch.Generator().manual_seed(1)
    b, length = args.train_batch, args.train_len
    input_ids = torch.randint(1, config.vocab_size, (b, length), generator=g)
    loss_mask = torch.ones(b, length - 1)
    loss_mask[:, : args.train_prompt_len - 1] = 0  # prompt tokens carry no loss
    batch = SequenceBatch(input_ids, torch.ones_like(input_ids), loss_mask,
                          {"advantages": torch.randn(b, generator=g)})
    total = loss_mask.sum()

    def loss_fn(logprobs, entropy, mb):  # a policy-gradient-shaped loss with global token normalisation
        loss = -((mb.fields["advantages"][:, None] * logprobs + 1e-3 * entropy) * mb.loss_mask).sum() / total
        return loss, {}

    reference = None
    for fused in ("off", "on"):
        print(f"HFPolicy step, {b} x {length} tokens, fused_kernel={fused} ...", flush=True)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        policy = HFPolicy(model, OptimConfig(lr=1e-6), device=device, fused_kernel=fused,
                          gradient_checkpointing=args.grad_ckpt)
        logprobs, _ = policy.get_inference_log_probs(batch, args.micro_batch)
        if reference is None:
            reference = logprobs
        else:
            diff = (logprobs - reference).abs().max().item()
            print(f"  max |logprob(fused on) - logprob(fused off)| = {diff:.2e}", flush=True)
        def step():
            policy.get_loss_and_metrics(batch, args.micro_batch, loss_fn)
            policy.optimizer_step()
        step()  # warm-up: kernel compilation, allocator growth
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, seconds = timed(lambda: [step() for _ in range(args.train_steps)], device)
        seconds /= args.train_steps
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.type == "cuda" else ""
        rows.append(("train", f"HFPolicy fused={fused}", seconds, b * length / seconds, peak))
        del policy, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = command_line(__doc__, out=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small model and shapes (= --model quick)")
    parser.add_argument("--model", choices=("full", "quick", "main-job"), default=None,
                        help="full: Qwen2.5-1.5B-shaped (default); quick: 2 x 128; main-job: the built-in student")
    parser.add_argument("--refits", type=int, default=5, help="vLLM engine: timed refits (the median is reported)")
    parser.add_argument("--shapes", help="rollout rows x new tokens, comma-separated (default 64x512,512x1024; "
                                         "quick 8x32)")
    parser.add_argument("--prompt-len", type=int, help="rollout prompt tokens (default 128; quick 16)")
    parser.add_argument("--samples-per-prompt", type=int, help="rows per prompt (RED's G; default 8, main-job 7)")
    parser.add_argument("--engines", default="local,megatron",
                        help="comma-separated: local, megatron, vllm (eager and CUDA graph), or local-eager, "
                             "local-graph, megatron-eager, megatron-graph, vllm-eager, vllm-graph")
    parser.add_argument("--kv-block-size", type=int, default=64,
                        help="megatron engine: KV block tokens (prefix sharing is per full block)")
    parser.add_argument("--skip-hf-generate", action="store_true", help="skip the (slow) HF generate baseline")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--train-batch", type=int, help="training sequences (default 4; quick 2)")
    parser.add_argument("--train-len", type=int, help="tokens per training sequence (default 4096; quick 128)")
    parser.add_argument("--train-prompt-len", type=int, default=16, help="leading tokens without loss")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward")
    parser.add_argument("--train-steps", type=int, default=2, help="timed steps after one warm-up step (>= 1)")
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    args.model = args.model or ("quick" if args.quick else "full")
    for name, full, quick, main_job in (("shapes", "64x512,512x1024", "8x32", "56x192,504x192"),
                                        ("prompt_len", 128, 16, 48), ("train_batch", 4, 2, 2),
                                        ("train_len", 4096, 128, 128), ("samples_per_prompt", 8, 8, 7)):
        if getattr(args, name) is None:
            setattr(args, name, {"full": full, "quick": quick, "main-job": main_job}[args.model])
    args.shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    args.engines = args.engines.split(",")
    known = {"local", "megatron", "vllm", "local-eager", "local-graph", "megatron-eager", "megatron-graph",
             "vllm-eager", "vllm-graph"}
    if set(args.engines) - known:
        parser.error(f"unknown --engines {sorted(set(args.engines) - known)}; known: {sorted(known)}")
    if args.device == "cpu":
        args.engines = [e for e in args.engines if not e.startswith("megatron")]  # megatron's engine needs CUDA
    else:
        require_cuda("bench_rollout.py --device cuda", hint="; `--device cpu --quick` smoke-tests the local engine")

    if args.train_steps < 1 or args.micro_batch < 1:
        parser.error("--train-steps and --micro-batch must be >= 1")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args.model)
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}; activations {dtype}", flush=True)

    rows: list = []
    bench_rollout(args, config, device, dtype, rows)
    if not args.skip_train:
        bench_train(args, config, device, rows)

    print(f"\n{'work':8} {'implementation':34} {'seconds':>9} {'tokens/s':>11}  notes")
    for work, impl, seconds, rate, note in rows:
        print(f"{work:8} {impl:34} {seconds:9.3f} {rate:11.0f}  {note}")
    if device.type == "cpu":
        print("(megatron engine rows need CUDA)")
    rates = {(work, impl): rate for work, impl, _, rate, _ in rows}
    for (work, impl), rate in rates.items():
        if impl.startswith("LocalEngine") and (work, "HF generate") in rates:
            print(f"{work} {impl}: {rate / rates[work, 'HF generate']:.1f}x HF generate (target >= 10x)")
        local = {"megatron engine (eager)": "LocalEngine (eager)", "vLLM engine (eager)": "LocalEngine (eager)",
                 "megatron engine + CUDA graphs": "LocalEngine + CUDA graph",
                 "vLLM engine + CUDA graphs": "LocalEngine + CUDA graph"}.get(impl)
        if local and (work, local) in rates:
            print(f"{work} {impl}: {rate / rates[work, local]:.2f}x {local}")
        if impl.startswith("megatron engine") and work == "512x1024":
            print(f"{work} {impl}: {rate:.0f} tokens/s (issue 9 target >= 25000 on one H200)")


if __name__ == "__main__":
    main()
