"""`megatron-red eval`: evaluate a model (HF directory, training run or checkpoint) on the RED paper's benchmarks.

Benchmarks default to the paper's suite; `--benchmarks` takes a subset.

Example:
    megatron-red eval --model runs/red --benchmarks math500,aime24 --limit 50 --out runs/eval1
Rerunning with the same --out resumes from the generation cache. Students too large for one GPU generate with
megatron-core's engine on TP x PP shards (every process reads and holds one shard; rank 0 grades and writes):
    torchrun --nproc_per_node=4 -m megatron_red.cli eval --engine megatron --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --model runs/red --out runs/eval1
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from megatron_red.errors import ConfigError
from megatron_red.eval.benchmarks import BENCHMARKS, SUITES
from megatron_red.eval.prompting import PROMPT_STYLES
from megatron_red.rollout.base import ENGINE_KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Hugging Face model directory, a training run directory (its final hf/, else its latest "
                             "checkpoint) or a checkpoint directory (its hf/, else exported into OUT/model)")
    parser.add_argument("--suite", default="red-paper", choices=sorted(SUITES),
                        help="named set of benchmarks (red-paper: AIME24/25 and AMC avg@32, MATH500, Minerva, "
                             "OlympiadBench pass@1; temperature 0.6, 8192 new tokens)")
    parser.add_argument("--benchmarks", default=None,
                        help=f"comma-separated subset of the suite; known: {','.join(BENCHMARKS)}")
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "eval"),
                        help="directory with the benchmark jsonl files (or LUFFY's valid.all.parquet) and "
                             "luffy_system_prompt.txt")
    parser.add_argument("--out", required=True, help="output directory (cache, results.md, results.json)")
    parser.add_argument("--n", type=int, default=None, help="samples per problem, for every benchmark")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences (prompts x samples) per engine call")
    parser.add_argument("--prompt-style", default="chat-think", choices=PROMPT_STYLES,
                        help="chat-think: chat template + the <think> system prompt; chat: template only; "
                             "plain: problem text and a request for a boxed answer")
    parser.add_argument("--system-prompt-file", default=None,
                        help="system prompt for chat-think (default: DATA_DIR/luffy_system_prompt.txt)")
    parser.add_argument("--engine", default="local", choices=ENGINE_KINDS,
                        help="local: torch decode loop on one device; megatron: megatron-core's dynamic engine on "
                             "TP x PP shards, under torchrun (one process per shard); vllm: vLLM in this process, "
                             "reading the model directory itself (one process; install as for rollout.engine=vllm)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="megatron engine: TP degree")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="megatron engine: PP degree")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="megatron and vllm engines: longest prompt + response (default: the longest response "
                             "of the run + 2048 prompt tokens, at most the model's context length)")
    parser.add_argument("--kv-buffer-gb", type=float, default=None,
                        help="megatron and vllm engines: KV cache per GPU (default: --batch-size full-length "
                             "sequences)")
    parser.add_argument("--kv-block-size", type=int, default=256, help="megatron engine: tokens per KV block")
    parser.add_argument("--dist-timeout-minutes", type=float, default=60.0,
                        help="megatron engine: time-out of collectives (as trainer.dist_timeout_minutes)")
    parser.add_argument("--dump-problems", action="store_true", help="write problems.jsonl with every sample")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grade-timeout", type=float, default=5.0, help="seconds per graded answer")
    parser.add_argument("--grade-workers", type=int, default=None, help="grading processes (default min(4, cpus))")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _TokenizerAdapter:
    """A megatron_red tokenizer without a Hugging Face form (the built-in task's SentencePiece model) behind the
    part of the transformers tokenizer API that evaluation uses; it has no chat template (prompts are plain)."""

    chat_template = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.tokenizer.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer_for_eval(path: str):
    """The tokenizer saved with a model: a transformers tokenizer, or a megatron_red one written by `save`."""
    from megatron_red.data.tokenizer import META_FILE, HFTokenizer, load_tokenizer

    if os.path.exists(os.path.join(path, META_FILE)):
        tokenizer = load_tokenizer(path)
        return tokenizer.hf if isinstance(tokenizer, HFTokenizer) else _TokenizerAdapter(tokenizer)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_model_and_tokenizer(path: str, device: str):
    """A local HF causal LM (bf16 on GPU, fp32 on CPU) in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ConfigError(f"--model {path}: not a directory")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = load_tokenizer_for_eval(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    return model, tokenizer


PROMPT_ALLOWANCE = 2048  # prompt tokens the megatron engine leaves room for by default (benchmark prompts are shorter)


def load_megatron_engine(args: argparse.Namespace, model_dir: str, max_new_tokens: int):
    """Under torchrun: this rank's TP x PP shard of the Hugging Face model in `model_dir` (only that shard is read),
    megatron-core's engine over it, the tokenizer. `max_new_tokens`: the longest response of the run (sizes the
    engine with the prompt allowance)."""
    import torch

    from megatron_red.config import ModelConfig, RolloutConfig
    from megatron_red.distributed import init_distributed, under_torchrun
    from megatron_red.models.architectures import num_experts
    from megatron_red.models.hf_checkpoint import HFCheckpoint
    from megatron_red.models.megatron import MegatronConfig, ShardedModel, load_hf_config
    from megatron_red.trainer.build import build_engine, parallel_layout

    if not under_torchrun():
        raise ConfigError("--engine megatron runs under torchrun, e.g. torchrun --nproc_per_node=2 -m "
                          "megatron_red.cli eval --engine megatron --tensor-model-parallel-size 2 ...")
    init_distributed(args.dist_timeout_minutes)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if torch.distributed.get_world_size() != tp * pp:
        raise ConfigError(f"--engine megatron evaluates with one model-parallel group: launch "
                          f"{tp} x {pp} = {tp * pp} processes, not {torch.distributed.get_world_size()}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_config = load_hf_config(model_dir)
    layout = parallel_layout(ModelConfig(backend="megatron", tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp), tp * pp, device, num_experts(hf_config))
    sharded = ShardedModel.from_hf(hf_config, HFCheckpoint(model_dir), MegatronConfig(
        **dataclasses.asdict(layout), seed=args.seed, dist_timeout_minutes=args.dist_timeout_minutes))
    tokenizer = load_tokenizer_for_eval(model_dir)
    length = args.max_sequence_length or min(sharded.arch.max_position_embeddings, max_new_tokens + PROMPT_ALLOWANCE)
    rollout = RolloutConfig(max_batch_size=args.batch_size, kv_buffer_gb=args.kv_buffer_gb,
                            kv_block_size=args.kv_block_size, max_sequence_length=length)
    return build_engine("megatron", sharded, tokenizer, rollout), tokenizer


def _broadcast_from_rank0(obj):
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_red.config import RolloutConfig
    from megatron_red.distributed import init_distributed, under_torchrun
    from megatron_red.eval.report import to_markdown
    from megatron_red.eval.runner import EvalConfig, effective_specs, evaluate
    from megatron_red.rewards import configure_grader
    from megatron_red.trainer.build import build_engine
    from megatron_red.trainer.export import resolve_hf_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    # Under torchrun (`--engine megatron`) a checkpoint without hf/ is exported by the whole world at its layout.
    layout = (1, 1)
    if args.engine == "megatron" and under_torchrun():
        init_distributed(args.dist_timeout_minutes)
        layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    model_dir = str(resolve_hf_model(args.model, os.path.join(args.out, "model"), *layout))
    config = EvalConfig(
        model_id=os.path.realpath(model_dir), out_dir=args.out, suite=args.suite,
        benchmarks=args.benchmarks.split(",") if args.benchmarks else None, data_dir=args.data_dir, n=args.n,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, limit=args.limit,
        batch_size=args.batch_size, prompt_style=args.prompt_style, system_prompt_file=args.system_prompt_file,
        dump_problems=args.dump_problems, seed=args.seed, grade_timeout_s=args.grade_timeout,
        progress=not args.no_progress,
    )
    if args.grade_workers is not None:
        configure_grader(args.grade_workers)
    writer, share = True, None
    if args.engine == "megatron":
        longest = max(s.max_new_tokens for s in effective_specs(config))
        engine, tokenizer = load_megatron_engine(args, model_dir, longest)
        writer, share = torch.distributed.get_rank() == 0, _broadcast_from_rank0
    elif args.engine == "vllm":
        if under_torchrun():
            raise ConfigError("--engine vllm evaluates in one process (a student too big for one GPU: --engine "
                              "megatron under torchrun)")
        longest = max(s.max_new_tokens for s in effective_specs(config))
        tokenizer = load_tokenizer_for_eval(model_dir)
        rollout = RolloutConfig(max_batch_size=args.batch_size, kv_buffer_gb=args.kv_buffer_gb)
        engine = build_engine("vllm", model_dir, tokenizer, rollout,
                              max_sequence_length=args.max_sequence_length or longest + PROMPT_ALLOWANCE)
    else:
        model, tokenizer = load_model_and_tokenizer(model_dir, device)
        engine = build_engine(args.engine, model, tokenizer, RolloutConfig(max_batch_size=args.batch_size))
    try:
        report = evaluate(engine, tokenizer, config, writer=writer, share=share)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished samples are cached in {args.out}: rerun the same command to resume",
              file=sys.stderr)
        return 130
    if report is None:  # a megatron rank other than 0: it generated, rank 0 graded and wrote
        return 0
    print(to_markdown(report))
    print(f"generated {report.generated_samples} samples, reused {report.cache.used} from the cache")
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0
